"""``python -m pipeline`` and the ``metadata-pipeline`` script."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from pipeline.redact import printable


def run() -> None:
    """The command line. A dask config file that does not parse, or settings in it that distributed refuses
    when imported (a logging level it does not know), is one line, exit 2, as any bad setting: dask reads
    its files when first imported, and distributed sets up logging from them when it is, both before the
    command line runs (distributed is imported here only when the configuration holds what it may read)."""
    try:
        import dask.config
    except ImportError:
        raise
    except Exception as exc:  # noqa: BLE001  # its files are all it reads: a key not text, a section not a mapping
        text = str(exc)
        _fail(text if "dask config file" in text else f"dask refused its configuration: {type(exc).__name__}: {text}")
    from pipeline.cli import main  # the pipeline's defaults join dask's

    try:
        if _unknown_to_defaults(dask.config.config, dask.config.defaults):
            import distributed  # noqa: F401
    except Exception as exc:  # noqa: BLE001  # whatever distributed raises on a setting it refuses
        _fail(f"distributed refused the dask configuration: {type(exc).__name__}: {exc}")
    main(prog_name="metadata-pipeline")


def _unknown_to_defaults(config: Mapping[str, Any], defaults: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the configuration holds a top-level key that neither dask's nor the pipeline's defaults hold:
    what distributed reads when it is imported (``distributed``, ``logging``, and the old names it moves
    into ``distributed`` first, such as ``log-format``), or nothing at all; a command line that imports
    distributed only then starts a second sooner when there is none."""
    known = {key for default in defaults for key in default}
    return any(key not in known for key in config)


def _fail(reason: str) -> NoReturn:
    print(f"error: {printable(' '.join(reason.split()))}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    run()
