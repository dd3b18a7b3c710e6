"""``python -m pipeline`` and the ``metadata-pipeline`` script."""

from __future__ import annotations

import sys

from pipeline.redact import printable


def run() -> None:
    """The command line. A dask config file that does not parse is one line, exit 2, as any bad setting:
    dask reads its files when it is first imported, before the command line is."""
    try:
        from pipeline.cli import main
    except ValueError as exc:
        if "dask config file" not in str(exc):
            raise
        print(f"error: {printable(' '.join(str(exc).split()))}", file=sys.stderr)
        sys.exit(2)
    main(prog_name="metadata-pipeline")


if __name__ == "__main__":
    run()
