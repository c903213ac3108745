"""Error pages for the page blueprints: a missing or another user's resource, an upload over the size limit."""

from __future__ import annotations

from flask import Blueprint, render_template

from app.jobs.errors import NotFound
from app.web.context import settings


def install(blueprint: Blueprint) -> None:
    """Render NotFound and abort(404) as the 404 page, and a too-large request as a 413 page naming the limit."""

    @blueprint.errorhandler(NotFound)
    def _not_found(exc: NotFound):
        return render_template("error.html", status=404, message=str(exc)), 404

    @blueprint.errorhandler(404)
    def _no_such_page(_exc):
        # abort(404): a page that does not exist for this person (the admin pages for everyone else).
        return render_template("error.html", status=404, message="There is no such page."), 404

    @blueprint.errorhandler(413)
    def _too_large(_exc):
        limit = human_bytes(settings().max_upload_bytes)
        return render_template("error.html", status=413, message=f"The file is larger than the {limit} limit."), 413


def human_bytes(n: int) -> str:
    """``n`` bytes as a short reading: 200 MiB, 1.5 KiB."""
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" or size == int(size) else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} bytes"
