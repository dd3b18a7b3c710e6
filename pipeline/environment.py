"""Software-environment metadata: what is installed where the cluster runs.

``get_versions()`` that distributed exchanges holds only ~10 core packages, so
the full list comes from ``importlib.metadata`` on the scheduler and on each
worker (run there through the scheduler's broadcast).
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from typing import Any

__all__ = ["environment_id", "installed_environment"]


def installed_environment() -> dict[str, Any]:
    """Python version and every installed distribution (name → version) of this process."""
    packages: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            packages[name.lower().replace("_", "-")] = dist.version
    return {"python_version": platform.python_version(), "packages": dict(sorted(packages.items()))}


def environment_id(image: str | None, python_version: str, packages: dict[str, str]) -> str:
    """Content hash of an environment: equal environments get equal ids."""
    canonical = json.dumps({"image": image, "python_version": python_version, "packages": packages}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]
