"""The list endpoint's filters, search, sorting and paging, its query string (bad, odd or hostile), and the summary."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from .helpers import assert_error

NOW = datetime.now(UTC)


def iso(days: float) -> str:
    return (NOW + timedelta(days=days)).isoformat()


@pytest.fixture
def tasks(create_task):
    """A small, varied set for alice, plus bob's tasks that must never show up."""
    made = {
        "milk": create_task(title="Buy milk", priority="low", tags=["home", "errands"], due_date=iso(-2)),
        "report": create_task(title="Write report", description="Quarterly 100% numbers", priority="high",
                              tags=["work"], due_date=iso(3), status="in_progress"),
        "dentist": create_task(title="Call dentist", priority="medium", tags=["health"], completed=True,
                               due_date=iso(-1)),
        "taxes": create_task(title="File taxes", description="snake_case form", priority="high",
                             tags=["home", "finance"]),
        "plan": create_task(title="plan trip", priority="medium", tags=["home", "travel"], due_date=iso(10)),
    }
    create_task(user="bob", title="Buy milk", tags=["home"], priority="low")
    return made


def titles(client, auth, query: str = "") -> list[str]:
    response = client.get(f"/api/alice/tasks?{query}", headers=auth())
    assert response.status_code == 200, response.json
    assert response.headers["X-Total-Count"] == str(len(response.json))  # every case fits on the first page
    return [task["title"] for task in response.json]


def names(made: dict, *keys: str) -> list[str]:
    return [made[key]["title"] for key in keys]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ["plan", "taxes", "dentist", "report", "milk"]),
        ("completed=true", ["dentist"]),
        ("completed=false", ["plan", "taxes", "report", "milk"]),
        ("status=all", ["plan", "taxes", "dentist", "report", "milk"]),
        ("status=pending", ["plan", "taxes", "milk"]),
        ("status=in_progress", ["report"]),
        ("status=completed", ["dentist"]),
        ("priority=high", ["taxes", "report"]),
        ("priority=high&priority=low", ["taxes", "report", "milk"]),
        ("tag=home", ["plan", "taxes", "milk"]),
        ("tag=home&tag=finance", ["taxes"]),
        ("tag=home&tag=work", []),
        ("tag=%20home%20", ["plan", "taxes", "milk"]),
        ("q=MILK", ["milk"]),
        ("q=quarterly", ["report"]),
        ("search=trip", ["plan"]),
        ("q=zzz", []),
        ("overdue=true", ["milk"]),
        ("overdue=false", ["plan", "taxes", "dentist", "report"]),
        (f"due_before={iso(0)[:19]}Z", ["dentist", "milk"]),
        (f"due_after={iso(0)[:19]}Z", ["plan", "report"]),
        (f"due_after={iso(-1.5)[:19]}Z&due_before={iso(5)[:19]}Z", ["dentist", "report"]),
        ("completed=false&priority=high&q=e", ["taxes", "report"]),
        ("completed=false&priority=high&priority=medium&tag=home", ["plan", "taxes"]),
        ("status=pending&overdue=false&tag=home", ["plan", "taxes"]),
    ],
)
def test_filters(client, auth, tasks, query, expected):
    assert titles(client, auth, query) == names(tasks, *expected)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("sort=created_at&order=asc", ["milk", "report", "dentist", "taxes", "plan"]),
        ("sort=created&order=asc", ["milk", "report", "dentist", "taxes", "plan"]),  # the plans' frontends' name
        ("sort=created", ["plan", "taxes", "dentist", "report", "milk"]),
        ("sort=title&order=asc", ["milk", "dentist", "taxes", "plan", "report"]),
        ("sort=title&order=desc", ["report", "plan", "taxes", "dentist", "milk"]),
        ("sort=updated_at&order=desc", ["plan", "taxes", "dentist", "report", "milk"]),
        ("sort=priority&order=desc", [("taxes", "report"), ("plan", "dentist"), "milk"]),
        ("sort=priority&order=asc", ["milk", ("dentist", "plan"), ("report", "taxes")]),
        ("sort=due_date&order=asc", ["milk", "dentist", "report", "plan", "taxes"]),
        ("sort=due_date&order=desc", ["plan", "report", "dentist", "milk", "taxes"]),
    ],
)
def test_sorting(client, auth, tasks, query, expected):
    """A tuple in `expected` is a tie (the same priority): its tasks come in id order, in the sort's direction."""
    descending = "order=desc" in query
    order: list[str] = []
    for group in expected:
        tie = group if isinstance(group, tuple) else (group,)
        order += sorted(tie, key=lambda key: tasks[key]["id"], reverse=descending)
    assert titles(client, auth, query) == names(tasks, *order)


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_tasks_without_due_date_come_last_in_both_orders(client, auth, create_task, order):
    for days in (None, 1, None, 2):
        create_task(due_date=iso(days) if days else None)
    dues = [t["due_date"] for t in client.get(f"/api/alice/tasks?sort=due_date&order={order}", headers=auth()).json]
    assert dues[2:] == [None, None]
    assert dues[:2] == sorted(dues[:2], reverse=order == "desc")


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_ties_are_broken_by_id(client, auth, create_task, order):
    for _ in range(6):
        create_task(priority="medium", title="same")
    ids = [t["id"] for t in client.get(f"/api/alice/tasks?sort=priority&order={order}", headers=auth()).json]
    assert ids == sorted(ids, reverse=order == "desc")
    ids = [t["id"] for t in client.get(f"/api/alice/tasks?sort=title&order={order}", headers=auth()).json]
    assert ids == sorted(ids, reverse=order == "desc")


@pytest.mark.parametrize("needle", ["%", "_", "\\"])
def test_search_wildcards_match_only_themselves(client, auth, create_task, needle):
    create_task(title=f"50{needle} off")
    create_task(title="plain title")
    create_task(title="another", description=f"has a {needle} inside")
    create_task(title="abc", description="no special characters")
    found = titles(client, auth, f"q={needle.replace('%', '%25')}")
    assert sorted(found) == sorted([f"50{needle} off", "another"])


def test_search_is_case_insensitive_and_takes_unicode(client, auth, create_task):
    create_task(title="Café au lait")
    assert titles(client, auth, "q=CAF") == ["Café au lait"]
    assert titles(client, auth, "q=caf%C3%A9") == ["Café au lait"]


def test_total_count_follows_the_filters_while_paging(client, auth, tasks):
    response = client.get("/api/alice/tasks?tag=home&page_size=2&page=2", headers=auth())
    assert response.headers["X-Total-Count"] == "3"
    assert len(response.json) == 1
    assert '"total_pages": 2' in response.headers["X-Pagination"]


def test_walking_all_pages_has_no_duplicates_or_gaps(client, auth, runner, app):
    result = runner.invoke(args=["seed", "--user", "alice", "--count", "1000", "--random-seed", "7"])
    assert result.exit_code == 0, result.output
    for query in ("", "sort=priority&order=asc", "sort=due_date&order=desc", "sort=title", "completed=false"):
        seen: list[str] = []
        page = 1
        while True:
            response = client.get(f"/api/alice/tasks?page_size=150&page={page}&{query}", headers=auth())
            assert response.status_code == 200
            if not response.json:
                break
            seen += [task["id"] for task in response.json]
            page += 1
        total = int(response.headers["X-Total-Count"])
        assert len(seen) == len(set(seen)) == total, query
    assert int(client.get("/api/alice/tasks", headers=auth()).headers["X-Total-Count"]) == 1000


def test_a_full_page_of_1000(client, auth, runner):
    runner.invoke(args=["seed", "--user", "alice", "--count", "1000"])
    response = client.get("/api/alice/tasks?page_size=1000", headers=auth())
    assert response.status_code == 200 and len(response.json) == 1000


@pytest.mark.parametrize(
    "query",
    [
        "colour=blue",
        "&".join(f"p{i}=v" for i in range(5000)),
        "&".join(["priority=low"] * 5000),
        "&".join(["tag=t"] * 5000),
        "&".join(["q=a"] * 5000),
        "q=%E2%98%83", "q=%F0%9F%98%80", "q=%ff%fe", "q=%ED%A0%80", "q=%25_%5C", "q=\\", "q=%27%3B--",
        "search=%E2%80%AE", "q=" + "%C3%A9" * 200, "tag=%E2%98%83",
        "page=99999999999999999999", "page=9223372036854775807", "page=9223372036854775808",
        "page=4611686018427387904&page_size=2", "page=1000000000&page_size=1000",
        "due_before=9999-12-31T23:59:59Z", "due_after=0001-01-01T00:00:00Z", "user_id=bob",
    ],
)
def test_unknown_repeated_and_odd_but_valid_parameters_are_200(send, create_task, query):
    create_task()
    create_task(user="bob")
    response = send("get", f"/api/alice/tasks?{query}")
    assert response.status_code == 200, response.json
    assert isinstance(response.json, list) and all(item["user_id"] == "alice" for item in response.json)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("sort=name", "sort"), ("sort=%00", "sort"), ("sort=title;DROP%20TABLE%20tasks", "sort"),
        ("order=up", "order"), ("order=asc%00", "order"),
        ("status=done", "status"), ("status=%00", "status"),
        ("priority=urgent", "priority"), ("priority=%00", "priority"), ("priority=high&priority=bad", "priority"),
        ("priority=low&priority=urgent", "priority"),
        ("completed=yes", "completed"), ("completed=1", "completed"), ("completed=%00", "completed"),
        ("overdue=TRUE", "overdue"),
        ("due_before=tomorrow", "due_before"), ("due_before=%00", "due_before"),
        ("due_before=9999-12-31T23:59:59-23:59", "due_before"),
        ("due_after=2026-13-01", "due_after"), ("due_after=0001-01-01T00:00:00%2B23:59", "due_after"),
        ("q=a%00b", "q"), ("q=%00", "q"), ("q=" + "a" * 5000, "q"), ("search=a%00b", "search"),
        ("tag=", "tag"), ("tag=%00", "tag"),
        ("&".join(f"tag=t{i}" for i in range(21)), "tag"),  # a task has at most 20: quick 422, not 21 subqueries
        ("page=0", "page"), ("page=x", "page"), ("page=%00", "page"), ("page=-9223372036854775809", "page"),
        ("page=1e3", "page"), ("page=%E2%91%A0", "page"),
        ("page_size=0", "page_size"), ("page_size=1001", "page_size"), ("page_size=99999999999999999999", "page_size"),
    ],
)
def test_bad_parameters_are_422_naming_only_that_parameter(send, query, field):
    response = send("get", f"/api/alice/tasks?{query}")
    assert_error(response, 422, field)
    assert set(response.json["errors"]) == {field}


def test_summary_counts_in_one_response(client, auth, tasks):
    response = client.get("/api/alice/tasks/summary", headers=auth())
    assert response.status_code == 200
    assert response.json == {
        "total": 5, "completed": 1, "pending": 3, "in_progress": 1, "overdue": 1,
        "by_priority": {"low": 1, "medium": 2, "high": 2},
    }


def test_summary_of_a_new_user_is_zero(client, auth):
    assert client.get("/api/carol/tasks/summary", headers=auth("carol")).json == {
        "total": 0, "completed": 0, "pending": 0, "in_progress": 0, "overdue": 0,
        "by_priority": {"low": 0, "medium": 0, "high": 0},
    }


def test_pagination_metadata_is_flask_smorests():
    """tasks.Blueprint builds X-Pagination without flask-smorest's per-request schema; the values are the same."""
    import flask_smorest

    from todo_api.tasks import Blueprint

    for item_count in (0, 1, 49, 50, 51, 1000):
        for page_size in (1, 50, 1000):
            for page in (1, 2, 3, 20, 1001):
                ours = Blueprint._make_pagination_metadata(page, page_size, item_count)
                assert ours == flask_smorest.Blueprint._make_pagination_metadata(page, page_size, item_count)
