"""The control plane: the HTTP API ``metadata-pipeline serve`` runs (see DESIGN.md Part 2)."""

from __future__ import annotations

from pipeline.server.app import create_app

__all__ = ["create_app"]
