"""What a cluster needs to be private: its own TLS credentials and short-lived AWS credentials.

- :mod:`pipeline.security.tls`: a CA and certificates per cluster, private keys sealed
  under the account's data key in the metadata database.
- :mod:`pipeline.security.aws`: STS session tokens forwarded to workers by a WorkerPlugin,
  so the user's long-term AWS keys never leave the client.
"""
