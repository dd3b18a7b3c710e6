"""``configure(c)`` for dask-gateway: its settings, the backend it installs, what the scheduler gets."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import dask.config
import pytest
from dask_gateway_server.backends.base import Backend
from dask_gateway_server.backends.jobqueue.slurm import SlurmBackend
from dask_gateway_server.backends.local import UnsafeLocalBackend
from traitlets.config import Config

from pipeline.errors import ConfigError
from pipeline.integrations.gateway import GatewaySettings, configure, scheduler_env

REGISTRATION = {
    "cluster_id": "cluster-1",
    "account": "123",
    "user": "ann",
    "image": None,
    "token": "mp_" + "a" * 43,
    "ingest_url": "http://cp.example:8800",
    "intake_public_key": "key-text",
    "tls": {},
}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.token"
    path.write_text("mp_" + "g" * 43 + "\n")
    path.chmod(0o600)
    return path


def gateway_config(token_file: Path, **keys: str) -> dask.config.set:
    return dask.config.set(
        {"pipeline.gateway.url": "http://cp.example:8800/", "pipeline.gateway.token-file": str(token_file), **keys}
    )


def refused(c: Config) -> str:
    """The one line ``configure`` ends the gateway with (exit status 2)."""
    with pytest.raises(SystemExit) as ended, contextlib.redirect_stderr(io.StringIO()) as stderr:
        configure(c)
    assert ended.value.code == 2
    [line] = stderr.getvalue().splitlines()
    return line


def test_configure_wraps_the_backend_the_operator_chose(token_file: Path) -> None:
    for chosen in ("dask_gateway_server.backends.jobqueue.slurm.SlurmBackend", SlurmBackend):
        c = Config()
        c.DaskGateway.backend_class = chosen
        with gateway_config(token_file):
            configure(c)
        installed = c.DaskGateway.backend_class
        assert issubclass(installed, SlurmBackend) and installed.__name__ == "PipelineSlurmBackend"


def test_configure_without_a_backend_wraps_the_gateways_default(token_file: Path) -> None:
    c = Config()
    with gateway_config(token_file):
        configure(c)
    assert issubclass(c.DaskGateway.backend_class, UnsafeLocalBackend)


def test_a_backend_that_starts_clusters_elsewhere_is_refused_by_name(token_file: Path) -> None:
    class ElsewhereBackend(Backend):
        pass

    c = Config()
    c.DaskGateway.backend_class = ElsewhereBackend
    with gateway_config(token_file):
        assert "ElsewhereBackend" in refused(c)


def test_a_backend_that_cannot_be_imported_is_one_line(token_file: Path) -> None:
    """The KubeBackend without kubernetes_asyncio installed was a ModuleNotFoundError traceback."""
    c = Config()
    c.DaskGateway.backend_class = "dask_gateway_server.backends.nowhere.NoBackend"
    with gateway_config(token_file):
        assert "NoBackend' cannot be imported" in refused(c)


def test_settings_map_users_to_accounts_by_the_rule(token_file: Path, tmp_path: Path) -> None:
    with gateway_config(token_file, **{"pipeline.home": str(tmp_path / "home")}):
        per_user = GatewaySettings.from_config()
    with gateway_config(token_file, **{"pipeline.gateway.account": "research"}):
        fixed = GatewaySettings.from_config()
    assert (per_user.account_for("ann"), fixed.account_for("ann")) == ("ann", "research")
    assert per_user.url == "http://cp.example:8800"
    assert per_user.token() == "mp_" + "g" * 43
    assert per_user.cluster_home("c1") == tmp_path / "home" / "gateway-clusters" / "c1"


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"pipeline.gateway.url": None}, "pipeline.gateway.url"),
        ({"pipeline.gateway.account": "{team}"}, "pipeline.gateway.account"),
        ({"pipeline.gateway.token-file": "/nonexistent/token"}, "cannot read"),
        # tracebacks at configure time, or a failure of every cluster start: each one line naming the key
        ({"pipeline.gateway.account": "{user}}"}, "pipeline.gateway.account"),
        ({"pipeline.gateway.account": "{"}, "pipeline.gateway.account"),
        ({"pipeline.gateway.account": "{user:d}"}, "pipeline.gateway.account"),
        ({"pipeline.gateway.account": "{user!r}"}, "pipeline.gateway.account"),
        ({"pipeline.gateway.home": "{home.x}"}, "pipeline.gateway.home"),
        ({"pipeline.gateway.home": "{home[0]}"}, "pipeline.gateway.home"),
        ({"pipeline.gateway.home": "{home:>9}"}, "pipeline.gateway.home"),
        ({"pipeline.gateway.url": "ftp://cp.example"}, "pipeline.gateway.url"),
        ({"pipeline.gateway.url": "cp.example:8800"}, "pipeline.gateway.url"),
        ({"pipeline.gateway.url": [1, 2]}, "pipeline.gateway.url"),
        ({"pipeline.gateway.url": "http://[::1"}, "pipeline.gateway.url"),
        ({"pipeline.gateway.url": "http://127.0.0.1:notaport"}, "pipeline.gateway.url"),
        ({"pipeline.gateway.url": "http://user:pw@/x"}, "pipeline.gateway.url"),
        ({"pipeline.gateway.account": ""}, "pipeline.gateway.account"),
    ],
)
def test_settings_name_what_is_wrong(token_file: Path, keys: dict[str, str | None], message: str) -> None:
    with gateway_config(token_file, **keys), pytest.raises(ConfigError, match=message):  # type: ignore[arg-type]
        GatewaySettings.from_config()


def test_the_scheduler_env_reads_back_as_the_registration_with_strings_kept_strings(tmp_path: Path) -> None:
    env = scheduler_env(REGISTRATION, tmp_path / "c1", 5.0)
    config = dask.config.collect_env(env)["pipeline"]
    assert config["account"] == "123" and config["user"] == "ann" and config["cluster_id"] == "cluster-1"
    assert config["ingest"] == {"url": "http://cp.example:8800", "token": "mp_" + "a" * 43, "public_key": "key-text"}
    assert config["home"] == str(tmp_path / "c1") and config["emitter"] == {"close_timeout": "5s"}
    assert "DASK_PIPELINE__IMAGE" not in env


def test_the_scheduler_trusts_the_control_plane_as_the_gateway_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a private CA, the local backends' schedulers lacked SSL_CERT_FILE: nothing arrived while they ran."""
    monkeypatch.setenv("SSL_CERT_FILE", "/etc/pipeline/ca.pem")
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    env = scheduler_env(REGISTRATION, tmp_path / "c1", 5.0)
    assert env["SSL_CERT_FILE"] == "/etc/pipeline/ca.pem" and "SSL_CERT_DIR" not in env


def test_the_documented_config_file_installs_the_integration(token_file: Path) -> None:
    c = Config()
    source = (Path(__file__).parent.parent / "docs" / "dask_gateway_config.py").read_text()
    with gateway_config(token_file):
        exec(compile(source, "dask_gateway_config.py", "exec"), {"c": c})
    installed = c.DaskGateway.backend_class
    assert issubclass(installed, SlurmBackend) and installed.__name__ == "PipelineSlurmBackend"


def test_a_token_file_others_may_read_is_refused(token_file: Path) -> None:
    """A cluster's code runs on the gateway's host as its user: a 0644 token let it register clusters of any
    account (and close other users' clusters), as `tokens create ... > file` under the usual umask writes it."""
    token_file.chmod(0o644)
    with gateway_config(token_file), pytest.raises(ConfigError, match="may be read by others .*chmod 600"):
        GatewaySettings.from_config()


@pytest.mark.parametrize(
    "content",
    ['{"token": "mp_' + "s" * 43 + '", "token_id": "t1"}\n', "mp_" + "s" * 43 + "\nmp_" + "t" * 43 + "\n"],
    ids=["--json output", "two tokens"],
)
def test_a_token_file_of_anything_but_one_token_is_refused_without_quoting_it(token_file: Path, content: str) -> None:
    """`tokens create --json > file`, or two tokens during a rotation, went whole into an Authorization header:
    httpx refused it and the gateway logged the error quoting the header, the '*' token in full, three times."""
    token_file.write_text(content)
    with gateway_config(token_file), pytest.raises(ConfigError, match="must hold one gateway token") as refused:
        GatewaySettings.from_config()
    assert "sss" not in str(refused.value)


@pytest.mark.parametrize("value", ["1e3", "0x1F", "None"])
def test_a_fixed_account_read_from_the_environment_as_a_number_is_refused(token_file: Path, value: str) -> None:
    """dask reads DASK_PIPELINE__GATEWAY__ACCOUNT=1e3 as 1000.0: clusters went to account '1000.0' (and
    None to one account per user)."""
    read = dask.config.collect_env({"DASK_PIPELINE__GATEWAY__ACCOUNT": value})["pipeline"]["gateway"]["account"]
    keys = {"pipeline.gateway.account": read}
    with gateway_config(token_file, **keys), pytest.raises(ConfigError, match="is not text"):  # type: ignore[arg-type]
        GatewaySettings.from_config()


def test_a_local_backend_that_would_chown_the_root_is_refused() -> None:
    """dask-gateway-server 2026.3's LocalBackend chowns "/" to the cluster's user as it starts a cluster."""
    from dask_gateway_server.backends.local import LocalBackend

    c = Config()
    c.DaskGateway.backend_class = LocalBackend
    assert "changes the owner of / to the cluster's user" in refused(c)


def test_a_gateway_started_with_a_setting_missing_ends_in_one_line(token_file: Path, tmp_path: Path) -> None:
    """As an operator starts it: the documented config file, ``pipeline.gateway.url`` forgotten. The gateway's
    loading of its config file printed a traceback of the file's ``exec``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_PIPELINE__")}
    env.update(DASK_PIPELINE__GATEWAY__TOKEN_FILE=str(token_file), HOME=str(tmp_path))
    config = Path(__file__).parent.parent / "docs" / "dask_gateway_config.py"
    gateway = Path(sys.executable).with_name("dask-gateway-server")
    ended = subprocess.run([gateway, "-f", config], env=env, capture_output=True, text=True, timeout=120)
    assert ended.returncode == 2, ended.stderr
    assert ended.stderr.splitlines()[-1].startswith("error: pipeline.gateway.url and pipeline.gateway.token-file")
    assert "Traceback" not in ended.stderr


def test_a_cluster_started_after_its_token_file_was_opened_to_others_fails_naming_the_cluster(
    token_file: Path,
) -> None:
    """The token file is read at each registration: one made readable by others since the gateway started
    refuses the cluster, which the error named only for an unreachable control plane."""
    import asyncio
    from types import SimpleNamespace

    from pipeline.integrations.gateway import registering_backend

    with gateway_config(token_file):
        backend = registering_backend(UnsafeLocalBackend, GatewaySettings.from_config())
    token_file.chmod(0o644)
    starting = backend.do_start_cluster(object(), SimpleNamespace(username="ann", name="c0ffee"))
    with pytest.raises(ConfigError, match="^cluster c0ffee not registered with the control plane: pipeline.gateway"):
        asyncio.run(starting.__anext__())
