"""Whether a process that left its name somewhere (a lease, a folder) still runs.

A process id means a process only within one PID namespace of one boot of one host:
containers sharing a hostname, or two machines of one name, would take a running
process for dead. So a name records where its id is valid (:func:`namespace`), and
only a name of this very namespace is judged by its id.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

__all__ = ["alive", "dead_here", "namespace"]


@functools.cache
def namespace() -> str:
    """Where this process's id means this process: the boot and the PID namespace ("" when unknown)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12]
        pids = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc: nothing is judged by its id
        return ""
    return f"{boot}.{pids}"


def alive(pid: int) -> bool:
    """Whether process ``pid`` of this PID namespace runs (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_here(where: str, pid: str) -> bool:
    """Whether ``pid``, recorded with :func:`namespace` ``where``, names a process of this namespace that is gone."""
    return bool(where) and where == namespace() and pid.isdigit() and not alive(int(pid))
