"""Liveness and readiness probes."""

from __future__ import annotations

from flask.views import MethodView
from flask_smorest import Blueprint, abort
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from .db import get_db
from .errors import RETRY_AFTER_SECONDS
from .schemas import HealthSchema

blp = Blueprint("health", __name__, url_prefix="/health", description="Probes for load balancers")


@blp.route("")
class Live(MethodView):
    @blp.doc(security=[])
    @blp.response(200, HealthSchema)
    def get(self) -> dict[str, str]:
        """The process is up (no database access)."""
        return {"status": "ok"}


@blp.route("/ready")
class Ready(MethodView):
    @blp.alt_response(503, response="SERVICE_UNAVAILABLE")
    @blp.response(200, HealthSchema)
    @blp.doc(security=[])
    def get(self) -> dict[str, str]:
        """The database answers."""
        try:
            with get_db().engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except SQLAlchemyError:
            abort(503, message="Database unavailable", headers={"Retry-After": RETRY_AFTER_SECONDS})
        return {"status": "ok"}
