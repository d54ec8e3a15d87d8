"""The chat page's REST API and file serving (corral/server/web.py), through FastAPI's test client."""

import json
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from corral.server import web

API = "/corral/api"


@pytest.fixture
def client(tmp_path):
    from corral.store.store import Store

    app = FastAPI()
    app.include_router(web.router)
    pool = SimpleNamespace(default_model="smollm2:135m", paths={}, loaded=lambda: [])
    app.state.corral = SimpleNamespace(store=Store(tmp_path / "home"), pool=pool)
    with TestClient(app) as c:
        yield c
    store = getattr(app.state, "corral_conversations", None)
    if store is not None:
        store.close()


def test_page_is_served_with_a_strict_content_security_policy(client):
    res = client.get("/", headers={"Accept": "text/html,*/*;q=0.8"})  # a browser (tools get "Ollama is running")
    assert res.status_code == 200 and "<title>Corral</title>" in res.text
    csp = res.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert res.headers["x-content-type-options"] == "nosniff"


def test_static_files_are_served_with_their_types(client):
    for name, kind in [("app.js", "text/javascript"), ("markdown.js", "text/javascript"), ("app.css", "text/css")]:
        res = client.get("/corral/static/" + name)
        assert res.status_code == 200 and res.headers["content-type"].startswith(kind)


@pytest.mark.parametrize("path", ["..%2Fweb.py", "..%2F..%2Fweb.py", ".hidden", "nope.js", "%2Fetc%2Fpasswd",
                                  "a/b/c/d.js"])
def test_static_refuses_traversal_and_unknown_files(client, path):
    res = client.get("/corral/static/" + path)
    assert res.status_code == 404
    assert "import" not in res.text  # never the source of web.py


def test_conversation_crud_and_message_tree(client):
    conv = client.post(f"{API}/conversations", json={"title": "t", "params": {"temperature": 0.3}}).json()
    cid = conv["id"]
    tree = client.post(f"{API}/conversations/{cid}/messages", json={"role": "user", "content": "hi"}).json()
    user_id = tree["leaf_id"]
    tree = client.post(f"{API}/conversations/{cid}/messages",
                       json={"role": "assistant", "content": "yo", "stats": {"tokens": 1}}).json()
    assert [m["content"] for m in tree["messages"]] == ["hi", "yo"] and len(tree["path"]) == 2
    tree = client.post(f"{API}/conversations/{cid}/messages/{user_id}/edit", json={"content": "hello"}).json()
    assert len(tree["path"]) == 1 and len(tree["messages"]) == 3
    tree = client.post(f"{API}/conversations/{cid}/select", json={"message_id": user_id}).json()
    assert [m["content"] for m in tree["messages"] if m["id"] in tree["path"]] == ["hi", "yo"]
    renamed = client.patch(f"{API}/conversations/{cid}", json={"title": "new", "system": "s"}).json()
    assert (renamed["title"], renamed["system"]) == ("new", "s")
    assert [c["id"] for c in client.get(f"{API}/conversations", params={"q": "hello"}).json()] == [cid]
    assert client.get(f"{API}/conversations", params={"q": "absent"}).json() == []
    assert client.delete(f"{API}/conversations/{cid}").status_code == 204
    assert client.get(f"{API}/conversations/{cid}").status_code == 404


@pytest.mark.parametrize("method, path, body, status, words", [
    ("post", "/conversations", b"{bad", 400, "not valid JSON"),
    ("post", "/conversations", b"[1]", 400, "JSON object"),
    ("post", "/conversations", {"colour": "red"}, 400, "unknown field"),
    ("post", "/conversations", {"params": {"temperature": "hot"}}, 400, "temperature"),
    ("get", "/conversations/nope", None, 404, "no conversation"),
    ("patch", "/conversations/nope", {"title": "x"}, 404, "no conversation"),
    ("post", "/conversations/nope/messages", {"role": "user", "content": "x"}, 404, "no conversation"),
])
def test_bad_requests_answer_json_errors(client, method, path, body, status, words):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    res = getattr(client, method)(API + path, **kwargs)
    assert res.status_code == status
    assert words in res.json()["error"]


def test_message_with_bad_role_or_parent_is_refused(client):
    cid = client.post(f"{API}/conversations", json={}).json()["id"]
    res = client.post(f"{API}/conversations/{cid}/messages", json={"role": "root", "content": "x"})
    assert res.status_code == 400 and "role" in res.json()["error"]
    res = client.post(f"{API}/conversations/{cid}/messages", json={"role": "user", "content": "x", "parent_id": 3})
    assert res.status_code == 400 and "parent_id" in res.json()["error"]
    res = client.post(f"{API}/conversations/{cid}/messages", json={"role": "user", "content": "x", "parent_id": "z"})
    assert res.status_code == 404
    assert client.get(f"{API}/conversations/{cid}").json()["messages"] == []


def test_export_then_import_copies_everything(client):
    cid = client.post(f"{API}/conversations", json={"title": "keep me"}).json()["id"]
    client.post(f"{API}/conversations/{cid}/messages", json={"role": "user", "content": "<b>hi</b>"})
    exported = client.get(f"{API}/export")
    assert exported.status_code == 200 and "attachment" in exported.headers["content-disposition"]
    res = client.post(f"{API}/import", content=exported.content)
    [new] = res.json()["imported"]
    assert client.get(f"{API}/conversations/{new}").json()["messages"][0]["content"] == "<b>hi</b>"
    assert len(client.get(f"{API}/conversations").json()) == 2


def test_import_of_bad_json_is_400_and_writes_nothing(client):
    client.post(f"{API}/conversations", json={"title": "only"})
    res = client.post(f"{API}/import", content=b'{"format": "corral-webui", "version": 1, "conversations": [')
    assert res.status_code == 400 and "not valid JSON" in res.json()["error"]
    half = {"format": "corral-webui", "version": 1,
            "conversations": [{"title": "good"}, {"title": "bad", "messages": [{"id": 1}]}]}
    res = client.post(f"{API}/import", content=json.dumps(half))
    assert res.status_code == 400 and "conversations[1]" in res.json()["error"]
    assert [c["title"] for c in client.get(f"{API}/conversations").json()] == ["only"]


def test_models_lists_the_default_model_before_it_is_stored(client):
    models = client.get(f"{API}/models").json()
    assert models == [{"name": "smollm2:135m", "context_length": None, "loaded": False, "default": True}]
