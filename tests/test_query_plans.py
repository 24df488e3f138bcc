"""PostgreSQL serves the common list pages from an index, within the user's rows, without a sort."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event, text

from todo_api.db import get_session
from todo_api.repositories import FETCH_NEWEST_PAGE_SQL, list_tasks


@pytest.fixture
def seeded(app, runner):
    for n in range(8):  # each user a small share of the table, as in production
        result = runner.invoke(args=["seed", "--user", f"planner-{n}", "--count", "1000", "--random-seed", str(n)])
        assert result.exit_code == 0, result.output
    with app.app_context():
        session = get_session()
        session.execute(text("ANALYZE tasks"))
        session.commit()  # releases the savepoint only; the test's outer transaction still rolls back
    return app


def page_plan(app, params: dict[str, Any]) -> str:
    """EXPLAIN of the exact page query the endpoint runs."""
    plans: list[str] = []

    def explain_first(_conn, cursor, statement, parameters, _context, _many):
        if statement.lstrip().upper().startswith("SELECT TASKS."):
            cursor.execute(f"EXPLAIN {statement}", parameters)
            plans.append("\n".join(row[0] for row in cursor.fetchall()))

    with app.app_context():
        session = get_session()
        connection = session.connection()
        event.listen(connection, "before_cursor_execute", explain_first)
        try:
            list_tasks(session, "planner-3", params, page=1, page_size=50)
        finally:
            event.remove(connection, "before_cursor_execute", explain_first)
    assert len(plans) == 1
    return plans[0]


# One test over all cases, so the (slow) seeding happens once.
INDEX_ORDERED_PAGES = [
    ({}, "Index Scan Backward using ix_tasks_user_created"),
    ({"completed": False}, "Index Scan Backward using ix_tasks_user_created"),
    ({"sort": "created_at", "order": "asc"}, "Index Scan using ix_tasks_user_created"),
    ({"sort": "updated_at"}, "Index Scan Backward using ix_tasks_user_updated"),
    ({"sort": "due_date", "order": "asc"}, "Index Scan using ix_tasks_user_due"),
    ({"sort": "priority"}, "Index Scan Backward using ix_tasks_user_priority"),
    ({"sort": "title", "order": "asc"}, "Index Scan using ix_tasks_user_title"),
]


def test_list_pages_read_in_index_order_without_sorting(seeded):
    for params, index in INDEX_ORDERED_PAGES:
        plan = page_plan(seeded, params)
        assert index in plan, (params, plan)
        assert "Sort" not in plan and "Seq Scan" not in plan, (params, plan)
        assert "Index Cond: ((user_id)::text = 'planner-3'::text)" in plan, (params, plan)
    # The hot path's own SQL for the unfiltered page (repositories.FETCH_NEWEST_PAGE_SQL), as the endpoint runs it.
    with seeded.app_context():
        cursor = get_session().connection().connection.cursor()
        cursor.execute(f"EXPLAIN {FETCH_NEWEST_PAGE_SQL}", {"user_id": "planner-3", "page_size": 50, "offset": 0})
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "Index Scan Backward using ix_tasks_user_created" in plan, plan
    assert "Sort" not in plan and "Seq Scan" not in plan, plan
