"""``python -m pipeline`` and the ``metadata-pipeline`` script."""

from __future__ import annotations

import sys

from pipeline.redact import printable


def run() -> None:
    """The command line. A dask config file that does not parse, or a ``logging`` section in it that
    distributed refuses (a level it does not know), is one line, exit 2, as any bad setting: dask reads
    its files when first imported, and distributed sets up logging from them when it is, both before the
    command line runs (distributed is imported here only when there is such a section to check)."""
    try:
        import dask.config

        from pipeline.cli import main

        if dask.config.get("logging", None) is not None:
            import distributed  # noqa: F401
    except ValueError as exc:
        if "dask config file" not in str(exc):
            _refused(exc)
        print(f"error: {printable(' '.join(str(exc).split()))}", file=sys.stderr)
        sys.exit(2)
    except (KeyError, TypeError, AttributeError) as exc:
        _refused(exc)
    main(prog_name="metadata-pipeline")


def _refused(exc: Exception) -> None:
    reason = " ".join(str(exc).split())
    print(
        printable(
            f"error: distributed refused the logging section of the dask configuration: {type(exc).__name__}: {reason}"
        ),
        file=sys.stderr,
    )
    sys.exit(2)


if __name__ == "__main__":
    run()
