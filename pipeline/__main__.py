"""``python -m pipeline`` and the ``metadata-pipeline`` script."""

from __future__ import annotations

import sys
from typing import NoReturn

from pipeline.redact import printable

#: top-level keys of the dask configuration distributed reads when it is imported (logging, its formats)
_READ_ON_IMPORT = ("logging", "logging-file-config", "distributed")


def run() -> None:
    """The command line. A dask config file that does not parse, or settings in it that distributed refuses
    when imported (a logging level it does not know), is one line, exit 2, as any bad setting: dask reads
    its files when first imported, and distributed sets up logging from them when it is, both before the
    command line runs (distributed is imported here only when the configuration holds what it reads)."""
    try:
        import dask.config

        from pipeline.cli import main
    except ValueError as exc:
        if "dask config file" not in str(exc):
            raise
        _fail(str(exc))
    try:
        if any(name in dask.config.config for name in _READ_ON_IMPORT):
            import distributed  # noqa: F401
    except Exception as exc:  # noqa: BLE001  # whatever distributed raises on a setting it refuses
        _fail(f"distributed refused the dask configuration: {type(exc).__name__}: {exc}")
    main(prog_name="metadata-pipeline")


def _fail(reason: str) -> NoReturn:
    print(f"error: {printable(' '.join(reason.split()))}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    run()
