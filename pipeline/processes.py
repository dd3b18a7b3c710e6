"""Whether a process that left its name somewhere (a lease, a folder) still runs."""

from __future__ import annotations

import os
import socket

__all__ = ["alive", "dead_here"]


def alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_here(holder: str) -> bool:
    """Whether ``holder`` (``host:pid:...``) names a process of this host that no longer runs."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    return host == socket.gethostname() and pid.isdigit() and not alive(int(pid))
