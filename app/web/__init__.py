"""The Flask front door: the application factory and its ``register_*`` helpers."""

from __future__ import annotations

import sys
from typing import Any

import orjson
from flask import Flask, Response
from flask.json.provider import DefaultJSONProvider

from app import settings as settings_module


# The web serves each request on a thread that blocks on the database and Redis several times; each
# time it wakes it waits for the GIL, up to the switch interval (5 ms by default) while another
# request thread parses or serialises. On SQLite that wait lands inside the write transaction, which
# holds the database-wide write lock for every other writer meanwhile. 0.5 ms bounds it; measured
# under wrk (POST /api/v1/jobs, SQLite, gunicorn 2 x 4 threads): ~270 -> ~450 req/s.
SWITCH_INTERVAL_SECONDS = 0.0005


class OrjsonProvider(DefaultJSONProvider):
    """Flask's JSON provider with orjson writing responses (keys stay in the order they were built).

    Parsing stays with the standard library: it reads ``NaN`` literals, which the spec validation
    then refuses with a 422 naming the field, rather than a bare "not JSON".
    """

    _options = orjson.OPT_NON_STR_KEYS

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        """Serialise ``obj`` to a JSON string (``indent`` gives orjson's two-space indentation, for pages)."""
        option = self._options | (orjson.OPT_INDENT_2 if kwargs.get("indent") else 0)
        return orjson.dumps(obj, default=DefaultJSONProvider.default, option=option).decode()

    def response(self, *args: Any, **kwargs: Any) -> Response:
        """A JSON response, encoded once, straight to bytes."""
        obj = self._prepare_response_obj(args, kwargs)
        body = orjson.dumps(obj, default=DefaultJSONProvider.default, option=self._options)
        return self._app.response_class(body, mimetype=self.mimetype)


def build_app(config: dict[str, Any] | None = None) -> Flask:
    """Create the app; ``config`` may override Kiln settings (``DATABASE_URL``...) and Flask keys."""
    config = dict(config or {})
    overrides = {}
    for key in list(config):
        field = key.lower()
        if field in settings_module.Settings.model_fields:
            overrides[field] = config.pop(key)
    settings = settings_module.SETTINGS.with_overrides(**overrides) if overrides else settings_module.SETTINGS

    sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_SECONDS))
    app = Flask(__name__)
    app.json = OrjsonProvider(app)
    app.config.update(SECRET_KEY=settings.secret_key, MAX_CONTENT_LENGTH=settings.max_upload_bytes)
    app.json.sort_keys = False  # resources read in the order they are built: id, kind, name, state...
    app.config.update(config)
    app.extensions["kiln"] = settings
    register_logging(settings)
    register_sessions(app)
    register_sign_in(app)
    register_errors(app)
    register_converters(app)
    register_rate_limits(app, settings)
    register_blueprints(app)
    return app


def register_logging(settings: settings_module.Settings) -> None:
    """JSON (or text) log lines at the configured level."""
    from app.logs import configure

    configure(settings.log_level, settings.log_format)


def register_sessions(app: Flask) -> None:
    """One database session per request, closed at teardown."""
    from app.web.context import close_session

    app.teardown_appcontext(close_session)


def register_sign_in(app: Flask) -> None:
    """Browser sessions (Flask-Login), CSRF on every form, cookie flags."""
    from app.web.login import register

    register(app)


def register_errors(app: Flask) -> None:
    """problem+json for the API, plain pages elsewhere."""
    from app.web.problems import register

    register(app)


def register_converters(app: Flask) -> None:
    """Path ids (``<int:...>`` and ``<id:...>``) bounded to the id column's range: a larger one is a 404."""
    from app.web.problems import register_converters as register

    register(app)


def register_rate_limits(app: Flask, settings: settings_module.Settings) -> None:
    """Per-token read and write budgets on the API, counted in Redis."""
    from app.web.rate_limits import register

    register(app, settings)


def register_blueprints(app: Flask) -> None:
    """The JSON API, its OpenAPI document, health, Prometheus metrics and the pages."""
    from app.web.api import api
    from app.web import api_accounts  # noqa: F401 - adds its routes to `api` before it is registered
    from app.web import api_pretrained  # noqa: F401 - adds its route to `api` before it is registered
    from app.web import api_jobs_extra  # noqa: F401 - likewise
    from app.web import api_webhooks  # noqa: F401 - likewise
    from app.web import api_predict  # noqa: F401 - likewise: inline predictions and prediction files
    from app.web import api_models  # noqa: F401 - the model registry's routes, on `api` too
    from app.web import api_stream  # noqa: F401 - likewise: Server-Sent Events of generated text
    from app.web.health import health
    from app.web.metrics import metrics
    from app.web.openapi import openapi
    from app.web.pages import pages
    from app.web.pages_account import account_pages
    from app.web.pages_admin import admin_pages
    from app.web.pages_datasets import datasets_pages

    app.register_blueprint(health)
    app.register_blueprint(metrics)
    app.register_blueprint(openapi)
    app.register_blueprint(api, url_prefix="/api/v1")
    app.register_blueprint(pages)
    app.register_blueprint(datasets_pages)
    app.register_blueprint(account_pages)
    app.register_blueprint(admin_pages)
