"""Print PostgreSQL's EXPLAIN ANALYZE for the exact queries the list endpoint runs (the page, and a count if any).

    DATABASE_URL=postgresql://... PYTHONPATH=. .venv/bin/python docs/explain.py user1
Seed first: `flask --app wsgi seed --user userN --count 10000` for N in 1..20 (200,000 rows).
"""

import sys
from typing import Any

from sqlalchemy import event

from todo_api import create_app
from todo_api.db import get_db, get_session
from todo_api.repositories import list_tasks

CASES: dict[str, dict[str, Any]] = {
    "default page (50)": {},
    "q + priority + completed=false": {"q": "report", "priority": ["high"], "completed": False},
    "sort=due_date asc": {"sort": "due_date", "order": "asc"},
    "sort=due_date desc": {"sort": "due_date", "order": "desc"},
    "sort=priority desc": {"sort": "priority", "order": "desc"},
    "sort=title asc": {"sort": "title", "order": "asc"},
    "sort=updated_at desc": {"sort": "updated_at", "order": "desc"},
    "tag=work + status=pending": {"tag": ["work"], "status": "pending"},
}


def main(user_id: str) -> None:
    app = create_app()
    plans: list[str] = []

    def explain_first(_conn: Any, cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        cursor.execute(f"EXPLAIN (ANALYZE, COSTS OFF) {statement}", parameters)
        plans.append("\n".join(row[0] for row in cursor.fetchall()))

    with app.app_context():
        event.listen(get_db().engine, "before_cursor_execute", explain_first)
        for name, params in CASES.items():
            plans.clear()
            list_tasks(get_session(), user_id, params, page=1, page_size=50)
            print(f"## {name}\n")
            for plan in plans:  # the page, then the count when the page cannot tell the total
                print(f"### {'page' if plan.startswith('Limit') else 'count'}\n{plan}\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "user1")
