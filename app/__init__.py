"""Kiln: PyTorch training and prediction jobs as a service."""

from __future__ import annotations

from typing import Any


def create_app(config: dict[str, Any] | None = None):
    """Build the Flask application; blueprints and extensions are bound here."""
    from app.web import build_app

    return build_app(config)
