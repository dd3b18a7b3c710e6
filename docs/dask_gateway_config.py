# dask_gateway_config.py: the dask-gateway server's own config file (`dask-gateway-server -f dask_gateway_config.py`)
# with every cluster it starts registered with the metadata control plane and running the plugin.
#
# Install on the gateway's host (and in the clusters' environment): pip install 'dask-metadata-pipeline[gateway]'
# On the control plane, once (0600: cluster code on the gateway's host must not read it):
#   (umask 077; metadata-pipeline tokens create --role gateway --account '*' > gateway.token)
# The gateway's environment (or a dask config file of the gateway's user):
#   DASK_PIPELINE__GATEWAY__URL=https://metadata.example.com      # the control plane's base URL
#   DASK_PIPELINE__GATEWAY__TOKEN_FILE=/etc/dask-gateway/gateway.token   # 0600, the gateway's user only
#   DASK_PIPELINE__GATEWAY__ACCOUNT='{user}'    # default: one account per gateway user; or a fixed account name
#   DASK_PIPELINE__GATEWAY__HOME=/var/lib/metadata-pipeline/clusters   # each cluster's spool: <this>/<cluster name>

# Choose the backend and authenticator as usual, first (not LocalBackend of dask-gateway-server 2026.3: it chowns "/"
# as it starts a cluster, and configure() refuses it; UnsafeLocalBackend runs clusters as the gateway's user, whose
# code can then read the gateway token: for a single trusted user only) ...
c.DaskGateway.backend_class = "dask_gateway_server.backends.jobqueue.slurm.SlurmBackend"  # noqa: F821 (c: the config)
c.ClusterConfig.scheduler_cmd = ["dask", "scheduler"]  # noqa: F821 (distributed 2026.8 has no dask-scheduler command)
c.ClusterConfig.worker_cmd = ["dask", "worker"]  # noqa: F821
c.DaskGateway.authenticator_class = "dask_gateway_server.auth.JupyterHubAuthenticator"  # noqa: F821

# ... then let the pipeline wrap that backend: registration for the authenticated user, the cluster token in the
# scheduler's environment only, `--preload pipeline.preload`, a spool per cluster, closing when the gateway stops it.
from pipeline.integrations.gateway import configure  # noqa: E402

configure(c)  # noqa: F821
