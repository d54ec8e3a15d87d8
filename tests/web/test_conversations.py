"""The chat page's conversation store: tree of messages, branches, search, export/import."""

import json
import sqlite3
import threading

import pytest

from corral.errors import CorralError
from corral.server.conversations import (
    SCHEMA_VERSION,
    ConversationError,
    ConversationNotFound,
    ConversationStore,
    default_path,
)


@pytest.fixture
def store(tmp_path):
    s = ConversationStore(tmp_path / "webui.sqlite3")
    yield s
    s.close()


def _chat(store, *turns):
    conv = store.create("chat", model="smollm2:135m")
    ids = [store.add_message(conv["id"], role, text)["id"] for role, text in turns]
    return conv["id"], ids


def test_default_path_follows_corral_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path / "home"))
    assert default_path() == tmp_path / "home" / "webui.sqlite3"


def test_open_uses_wal_and_records_schema_version(store):
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_open_refuses_newer_schema(tmp_path):
    path = tmp_path / "w.sqlite3"
    ConversationStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(ConversationError, match="schema version 99"):
        ConversationStore(path)


def test_create_get_update_delete_roundtrip(store):
    conv = store.create("First", model="m:1", system="be brief", params={"temperature": 0.5, "seed": 3})
    assert conv["title"] == "First" and conv["system"] == "be brief" and conv["leaf_id"] is None
    assert conv["params"] == {"temperature": 0.5, "seed": 3}
    updated = store.update(conv["id"], title="Renamed", params={"top_p": 0.9, "max_tokens": 64}, model="m:2")
    assert (updated["title"], updated["model"]) == ("Renamed", "m:2")
    assert updated["params"] == {"top_p": 0.9, "max_tokens": 64}
    assert store.get(conv["id"])["messages"] == []
    store.delete(conv["id"])
    with pytest.raises(ConversationNotFound):
        store.get(conv["id"])
    with pytest.raises(ConversationNotFound):
        store.delete(conv["id"])


def test_messages_form_a_path_from_root_to_leaf(store):
    conv_id, ids = _chat(store, ("user", "hi"), ("assistant", "hello"), ("user", "how are you"))
    tree = store.get(conv_id)
    assert tree["path"] == ids and tree["leaf_id"] == ids[-1]
    assert [m["parent_id"] for m in tree["messages"]] == [None, ids[0], ids[1]]


def test_edit_creates_a_branch_and_keeps_the_old_one(store):
    conv_id, ids = _chat(store, ("user", "hi"), ("assistant", "hello"), ("user", "tell me a joke"), ("assistant", "no"))
    new = store.edit_message(conv_id, ids[2], "tell me a story")
    tree = store.get(conv_id)
    assert new["parent_id"] == ids[1] and new["role"] == "user"
    assert tree["path"] == [ids[0], ids[1], new["id"]]
    assert len(tree["messages"]) == 5  # nothing deleted
    selected = store.select(conv_id, ids[2])  # back to the old branch: down to its newest leaf
    assert selected["path"] == ids


def test_select_follows_newest_children(store):
    conv_id, ids = _chat(store, ("user", "q"), ("assistant", "a1"))
    regen = store.add_message(conv_id, "assistant", "a2", parent_id=ids[0])
    assert store.get(conv_id)["path"] == [ids[0], regen["id"]]
    assert store.select(conv_id, ids[0])["path"] == [ids[0], regen["id"]]
    assert store.select(conv_id, ids[1])["path"] == ids


def test_add_message_refuses_parent_from_another_conversation(store):
    a, a_ids = _chat(store, ("user", "x"))
    b, _ = _chat(store, ("user", "y"))
    with pytest.raises(ConversationNotFound, match="no message"):
        store.add_message(b, "assistant", "z", parent_id=a_ids[0])
    assert len(store.get(b)["messages"]) == 1


@pytest.mark.parametrize("kwargs, match", [
    ({"role": "wizard", "content": "x"}, "role must be one of"),
    ({"role": "user", "content": 5}, "content must be a string"),
    ({"role": "user", "content": "a\x00b"}, "NUL"),
    ({"role": "user", "content": "x", "stats": [1]}, "stats must be a JSON object"),
])
def test_add_message_refuses_bad_input(store, kwargs, match):
    conv_id, _ = _chat(store)
    with pytest.raises(ConversationError, match=match):
        store.add_message(conv_id, **kwargs)
    assert store.get(conv_id)["messages"] == []


@pytest.mark.parametrize("params, match", [
    ({"temperature": -1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 2}, "top_p"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"seed": True}, "seed"),
    ({"seed": "3"}, "seed"),
    ({"top_k": 3}, "unknown parameter"),
])
def test_update_refuses_bad_params(store, params, match):
    conv = store.create("x", params={"temperature": 0.7})
    with pytest.raises(ConversationError, match=match):
        store.update(conv["id"], params=params)
    assert store.conversation(conv["id"])["params"] == {"temperature": 0.7}


def test_update_refuses_unknown_field_and_long_title(store):
    conv = store.create("x")
    with pytest.raises(ConversationError, match="unknown field"):
        store.update(conv["id"], leaf_id="abc")
    with pytest.raises(ConversationError, match="title is 201 characters"):
        store.update(conv["id"], title="t" * 201)
    assert isinstance(ConversationError("x"), CorralError)


def test_list_searches_titles_and_content_newest_first(store):
    a, _ = _chat(store, ("user", "tell me about llamas"))
    b = store.create("Alpaca facts")["id"]
    c, _ = _chat(store, ("user", "100% sure_thing"))
    assert [x["id"] for x in store.list()] == [c, b, a]
    assert [x["id"] for x in store.list("LLAMA")] == [a]
    assert [x["id"] for x in store.list("alpaca")] == [b]
    assert [x["id"] for x in store.list("100%")] == [c]
    assert [x["id"] for x in store.list("%")] == [c]  # % is literal, not a wildcard
    assert store.list("s_r") == []  # _ is literal too: as a wildcard it would match "sur" in "sure_thing"


def test_export_import_roundtrip_with_branches(store, tmp_path):
    conv_id, ids = _chat(store, ("user", "q"), ("assistant", "a"))
    store.edit_message(conv_id, ids[0], "q2")
    store.update(conv_id, system="sys", params={"temperature": 0.1})
    data = json.dumps(store.export())
    other = ConversationStore(tmp_path / "other.sqlite3")
    [new_id] = other.import_(data)
    got, want = other.get(new_id), store.get(conv_id)
    assert new_id != conv_id
    assert (got["title"], got["system"], got["params"]) == (want["title"], want["system"], want["params"])
    assert sorted(m["content"] for m in got["messages"]) == ["a", "q", "q2"]
    assert [other_msg["content"] for other_msg in map({m["id"]: m for m in got["messages"]}.get, got["path"])] == ["q2"]
    other.close()


@pytest.mark.parametrize("data, match", [
    (b"{not json", "not valid JSON"),
    (b"[]", "format"),
    (json.dumps({"format": "corral-webui", "version": 7, "conversations": []}), "version"),
    (json.dumps({"format": "corral-webui", "version": 1, "conversations": {}}), "conversations"),
    (json.dumps({"format": "corral-webui", "version": 1, "conversations": [
        {"title": "ok", "messages": []},
        {"title": "bad", "messages": [{"id": "1", "parent_id": "9", "role": "user", "content": "x"}]}]}),
     r"conversations\[1\]: messages\[0\]: parent_id"),
    (json.dumps({"format": "corral-webui", "version": 1, "conversations": [
        {"messages": [{"id": "1", "parent_id": "2", "role": "user", "content": "x"},
                      {"id": "2", "parent_id": "1", "role": "user", "content": "y"}]}]}), "cycle"),
    (json.dumps({"format": "corral-webui", "version": 1, "conversations": [
        {"messages": [{"id": "1", "role": "user", "content": "x"}, {"id": "1", "role": "user", "content": "y"}]}]}),
     "unique"),
    (json.dumps({"format": "corral-webui", "version": 1, "conversations": [
        {"leaf_id": "zz", "messages": []}]}), "leaf_id"),
    (json.dumps({"format": "corral-webui", "version": 1, "conversations": [
        {"params": {"temperature": 9}, "messages": []}]}), "temperature"),
])
def test_import_refuses_bad_files_and_writes_nothing(store, data, match):
    before = store.export()
    with pytest.raises(ConversationError, match=match):
        store.import_(data)
    assert store.export() == before


def test_concurrent_writers_from_threads_all_land(store):
    conv_id, _ = _chat(store)
    errors = []

    def write(n):
        try:
            for i in range(20):
                store.add_message(conv_id, "user", f"{n}-{i}", parent_id=None)
        except Exception as e:  # noqa: BLE001 - any failure fails the test below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.get(conv_id)["messages"]) == 80
