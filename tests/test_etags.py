"""ETags: 304 on If-None-Match, 412 on a stale If-Match, and nothing changed after a 412."""

from __future__ import annotations

import pytest


def url(task) -> str:
    return f"/api/alice/tasks/{task['id']}"


def test_get_returns_a_strong_etag_and_if_none_match_gives_304(client, auth, create_task):
    task = create_task()
    response = client.get(url(task), headers=auth())
    etag = response.headers["ETag"]
    assert etag.startswith('"') and not etag.startswith("W/")
    not_modified = client.get(url(task), headers={**auth(), "If-None-Match": etag})
    assert not_modified.status_code == 304
    assert not_modified.data == b""
    assert not_modified.headers["ETag"] == etag


def test_etag_changes_whenever_the_task_changes(client, auth, create_task):
    task = create_task()
    before = client.get(url(task), headers=auth()).headers["ETag"]
    client.patch(f"{url(task)}/complete", headers=auth())
    after = client.get(url(task), headers=auth()).headers["ETag"]
    assert before != after
    assert client.get(url(task), headers={**auth(), "If-None-Match": before}).status_code == 200


def test_update_response_carries_the_new_etag(client, auth, create_task):
    task = create_task()
    response = client.patch(url(task), json={"title": "new"}, headers=auth())
    assert response.headers["ETag"] == client.get(url(task), headers=auth()).headers["ETag"]


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [("put", "", {"title": "x"}), ("patch", "", {"title": "x"}), ("delete", "", None),
     ("patch", "/complete", None), ("patch", "/complete", {"completed": True})],
)
def test_stale_if_match_is_412_and_the_task_is_unchanged(client, auth, create_task, method, suffix, body):
    task = create_task()
    stale = client.get(url(task), headers=auth()).headers["ETag"]
    client.patch(url(task), json={"description": "changed by another tab"}, headers=auth())
    current = client.get(url(task), headers=auth())
    response = getattr(client, method)(f"{url(task)}{suffix}", json=body, headers={**auth(), "If-Match": stale})
    assert response.status_code == 412
    assert set(response.json) == {"detail"}
    after = client.get(url(task), headers=auth())
    assert after.json == current.json and after.headers["ETag"] == current.headers["ETag"]


@pytest.mark.parametrize(
    ("method", "suffix", "body", "status"),
    [("put", "", {"title": "x"}, 200), ("patch", "", {"title": "x"}, 200), ("delete", "", None, 204),
     ("patch", "/complete", None, 200)],
)
def test_current_if_match_succeeds(client, auth, create_task, method, suffix, body, status):
    task = create_task()
    etag = client.get(url(task), headers=auth()).headers["ETag"]
    response = getattr(client, method)(f"{url(task)}{suffix}", json=body, headers={**auth(), "If-Match": etag})
    assert response.status_code == status


def test_if_match_star_matches_any_existing_task(client, auth, create_task):
    task = create_task()
    assert client.put(url(task), json={"title": "x"}, headers={**auth(), "If-Match": "*"}).status_code == 200


def test_writes_without_if_match_are_allowed(client, auth, create_task):
    task = create_task()
    assert client.put(url(task), json={"title": "x"}, headers=auth()).status_code == 200


def test_if_match_on_another_users_task_is_404(client, auth, create_task):
    bobs = create_task(user="bob")
    response = client.put(f"/api/alice/tasks/{bobs['id']}", json={"title": "x"}, headers={**auth(), "If-Match": "*"})
    assert response.status_code == 404


def test_updated_at_sort_follows_updates(client, auth, create_task):
    first, _second = create_task(title="first"), create_task(title="second")
    client.patch(url(first), json={"priority": "high"}, headers=auth())
    listed = client.get("/api/alice/tasks?sort=updated_at", headers=auth()).json
    assert listed[0]["id"] == first["id"]
