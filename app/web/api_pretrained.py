"""API route listing the pretrained-model catalog, registered on the ``/api/v1`` blueprint."""

from __future__ import annotations

from flask import jsonify

from app import pretrained
from app.web.api import api


@api.get("/pretrained")
def list_pretrained():
    """The catalog: each model's licence, size, weights sha256, tasks and whether it is installed."""
    return jsonify(items=[entry.public() for entry in pretrained.catalog().values()])
