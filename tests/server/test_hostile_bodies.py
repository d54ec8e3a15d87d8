"""Issue 14, bodies that were 500s and must be 4xx (items 8-11, RELIABILITY 43), a full disk (item 12,
RELIABILITY 44) and the embedded model seen by Ollama clients on a fresh store (item 15)."""

import errno
import json
import os
import sqlite3
import subprocess

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.errors import FormatError
from corral.server.ollama_wire import FIELD_TYPES
from corral.store.modelfile import parse_modelfile

MODEL = "smollm2:135m"
JSON = {"Content-Type": "application/json"}


def send(h, method, path, raw: str):
    return h.request(method, path, content=raw.encode(), headers=JSON)


def chat_id(h) -> str:
    return h.post("/corral/api/conversations", json={"title": "t"}).json()["id"]


# -- item 8: deep nesting ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/corral/api/conversations", "/corral/api/import", "/v1/chat/completions",
                                  "/api/chat", "/api/create"])
def test_ten_thousand_levels_of_nesting_are_a_400_on_every_route(live, path):
    """Issue 14 item 8: 10,000 nested arrays are a 400 that says so (the page's routes answered 500)."""
    with live.http() as h:
        r = send(h, "POST", path, '{"title": ' + "[" * 10_000 + "]" * 10_000 + "}")
    assert r.status_code == 400 and "nested deeper" in r.text


def test_a_deep_stats_object_is_refused_and_the_conversation_stays_readable(live):
    """Issue 14 item 8: a 900-deep `stats` was stored and then every GET of its conversation was a 500."""
    with live.http() as h:
        cid = chat_id(h)
        deep = '{"role": "assistant", "content": "hi", "stats": {"x": ' + "[" * 900 + "]" * 900 + "}}"
        added = send(h, "POST", f"/corral/api/conversations/{cid}/messages", deep)
        shallow = '{"role": "assistant", "content": "hi", "stats": {"x": ' + "[" * 20 + "]" * 20 + "}}"
        refused = send(h, "POST", f"/corral/api/conversations/{cid}/messages", shallow)
        read = h.get(f"/corral/api/conversations/{cid}")
    assert added.status_code == 400 and "stats" in added.json()["error"]
    assert refused.status_code == 400 and "nested deeper than 8" in refused.json()["error"]
    assert read.status_code == 200 and read.json()["messages"] == []


# -- item 9: lone surrogates -------------------------------------------------------------------------------

def test_lone_surrogates_are_a_400_naming_the_field(live):
    """Issue 14 item 9: "\\ud800" in a title, a message, an import, /api/create's system and a /v1 message is a
    400 naming the field; a real surrogate pair (an emoji) is still fine."""
    with live.http() as h:
        cid = chat_id(h)
        title = send(h, "POST", "/corral/api/conversations", '{"title": "a\\ud800b"}')
        message = send(h, "POST", f"/corral/api/conversations/{cid}/messages", '{"role": "user", "content": "\\udfff"}')
        export = {"format": "corral-webui", "version": 1, "conversations": [{"title": "SURROGATE", "messages": []}]}
        imported = send(h, "POST", "/corral/api/import", json.dumps(export).replace("SURROGATE", "\\ud800"))
        create = send(h, "POST", "/api/create", '{"model": "s:latest", "from": "MODEL", "system": "\\ud800"}'
                      .replace("MODEL", MODEL))
        v1 = send(h, "POST", "/v1/chat/completions",
                  '{"model": "MODEL", "messages": [{"role": "user", "content": "\\ud800"}]}'.replace("MODEL", MODEL))
        emoji = send(h, "POST", "/corral/api/conversations", '{"title": "\\ud83d\\ude00"}')
    assert title.status_code == 400 and "title" in title.json()["error"]
    assert message.status_code == 400 and "content" in message.json()["error"]
    assert imported.status_code == 400 and "conversations[0].title" in imported.json()["error"]
    assert create.status_code == 400 and "system" in create.json()["error"]
    assert v1.status_code == 400 and v1.json()["error"]["param"] == "messages[0].content"
    assert emoji.status_code == 200 and emoji.json()["title"] == "\U0001f600"


def test_the_conversation_store_refuses_surrogates_itself():
    """Issue 14 item 9: the library path (no HTTP parse in front) refuses them too, naming the field."""
    from corral.server.conversations import ConversationError, ConversationStore

    store = ConversationStore(":memory:")
    with pytest.raises(ConversationError, match="system"):
        store.create(system="\ud800")


# -- item 10: numbers beyond 64 bits -------------------------------------------------------------------------

def test_seeds_beyond_64_bits_are_a_400_on_v1(live):
    """Issue 14 item 10: seed 2^63 and -2^63-1 are 400s naming seed; 2^63-1 is served."""
    with live.http() as h:
        answers = [h.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1, "seed": seed})
                   for seed in (2**63, 99999999999999999999999, -(2**63) - 1, 2**63 - 1)]
    assert [r.status_code for r in answers] == [400, 400, 400, 200]
    assert all(r.json()["error"]["param"] == "seed" for r in answers[:3])


@pytest.mark.parametrize("line, field", [("PARAMETER seed 99999999999999999999999", "seed"),
                                         ("PARAMETER temperature 1e999", "temperature"),
                                         ("PARAMETER top_p 7", "top_p"), ("PARAMETER num_ctx 0", "num_ctx")])
def test_modelfile_parameters_out_of_range_are_refused_at_create(live, line, field):
    """Issue 14 item 10: such a Modelfile was stored and failed on every use; now create refuses it, with the
    parameter named, in the library (what `corral create` runs) and over /api/create, and nothing is stored."""
    with pytest.raises(FormatError, match=field):
        parse_modelfile(f"FROM x\n{line}\n")
    with live.http() as h:
        made = h.post("/api/create", json={"model": "badparam:latest", "modelfile": f"FROM {MODEL}\n{line}\n",
                                           "stream": False})
        tags = [m["name"] for m in h.get("/api/tags").json()["models"]]
    assert made.status_code == 400 and field in made.json()["error"]
    assert "badparam:latest" not in tags


def test_infinite_parameters_in_a_json_create_are_refused(live):
    """Issue 14 item 10: `1e999` in JSON decodes to infinity; /api/create's `parameters` refuses it."""
    with live.http() as h:
        made = send(h, "POST", "/api/create", '{"model": "inf:latest", "from": "MODEL", "stream": false, '
                    '"parameters": {"temperature": 1e999}}'.replace("MODEL", MODEL))
    assert made.status_code == 400 and "temperature" in made.json()["error"]


# -- item 11: wrong types on every Ollama route ----------------------------------------------------------------

ROUTES = [("POST", "/api/generate"), ("POST", "/api/chat"), ("POST", "/api/embed"), ("POST", "/api/embeddings"),
          ("POST", "/api/show"), ("POST", "/api/copy"), ("DELETE", "/api/delete"), ("POST", "/api/create"),
          ("POST", "/api/pull"), ("POST", "/api/push")]
WRONG = {(str,): 5, (bool,): "yes", (dict,): [1], (list,): 5, (str, dict): 5, (str, list): {"a": 1},
         (str, int, float): [1], (int,): "8"}


def test_the_reported_wrong_types_are_400s_naming_the_field(live):
    """Issue 14 item 11: the two 500s the tester found."""
    with live.http() as h:
        tools = h.post("/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                          "tools": [5]})
        embed = h.post("/api/embed", json={"model": 5, "input": "hi"})
        content = h.post("/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": 5}]})
    assert tools.status_code == 400 and "tools[0]" in tools.json()["error"]
    assert embed.status_code == 400 and "model must be a string" in embed.json()["error"]
    assert content.status_code == 400 and "messages[0].content" in content.json()["error"]


@pytest.mark.parametrize("method, path", ROUTES, ids=[p for _, p in ROUTES])
def test_every_field_of_the_wrong_type_is_a_400_naming_it_on_every_ollama_route(live, method, path):
    """Issue 14 item 11 (table-driven): each field an Ollama route reads, sent with a wrong JSON type."""
    with live.http() as h:
        for field, (kinds, _) in FIELD_TYPES.items():
            r = h.request(method, path, json={field: WRONG[kinds]})
            assert r.status_code == 400, (field, r.status_code, r.text)
            assert field in r.json()["error"], (field, r.text)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
                           | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
FUZZED = ["model", "prompt", "system", "template", "context", "format", "options", "messages", "tools", "input",
          "truncate", "dimensions", "raw", "images", "suffix", "think"]


@pytest.mark.slow
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(["/api/generate", "/api/chat", "/api/embed"]), field=st.sampled_from(FUZZED),
       value=JSON_VALUES)
def test_random_values_in_ollama_fields_never_give_a_500(live, route, field, value):
    """Issue 14 item 11 (property): any JSON value in any field of generate, chat or embed answers < 500."""
    base = {"model": MODEL, "stream": False, "options": {"num_predict": 1}, "prompt": "Hi", "input": "Hi",
            "messages": [{"role": "user", "content": "Hi"}]}
    with live.http() as h:
        # json.dumps, not httpx's json=: hypothesis's NaN and Infinity go out as the literals a client may send
        r = h.post(route, content=json.dumps({**base, field: value}), headers={"Content-Type": "application/json"})
    assert r.status_code < 500, r.text


# -- item 12: a full disk ----------------------------------------------------------------------------------

def app_client(home, **config):
    from corral.server.app import build_app
    from corral.server.state import ServeConfig, ServerState
    from corral.store import Store

    state = ServerState.create(ServeConfig(host="127.0.0.1", keep_alive=-1, **config), Store(home))
    return TestClient(build_app(state), base_url="http://127.0.0.1:11435", raise_server_exceptions=False)


def test_enospc_and_sqlite_full_are_507_no_space_left(tmp_path, monkeypatch):
    """Issue 14 item 12: the errors a full disk raises (injected at the write) answer 507 "no space left", in
    each dialect, never a 500 with the OS message."""
    from corral.server.conversations import ConversationStore
    from corral.store import Store

    def full_db(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "blobs" / "x"))

    monkeypatch.setattr(ConversationStore, "create", full_db)
    monkeypatch.setattr(Store, "copy", full_disk)
    with app_client(tmp_path) as c:
        chat = c.post("/corral/api/conversations", json={"title": "x"})
        copy = c.post("/api/copy", json={"source": "a:latest", "destination": "b:latest"})
    assert chat.status_code == 507 and "no space left" in chat.json()["error"]
    assert copy.status_code == 507 and str(tmp_path) not in copy.text


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_really_full_disk_answers_507_and_keeps_the_last_good_state(tiny_disk):
    """Issue 14 item 12 (a real 1 MiB tmpfs as CORRAL_HOME): chat messages and a blob upload that do not fit
    are 507; the messages saved before are all there, and no partial blob or temp file is left."""
    big = "x" * (200 << 10)
    with app_client(tiny_disk) as c:
        cid = c.post("/corral/api/conversations", json={"title": "t"}).json()["id"]
        statuses = [c.post(f"/corral/api/conversations/{cid}/messages", json={"role": "user", "content": big})
                    .status_code for _ in range(8)]
        kept = c.get(f"/corral/api/conversations/{cid}")
        blob = os.urandom(2 << 20)
        import hashlib

        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        upload = c.post(f"/api/blobs/{digest}", content=blob, headers={"Content-Type": "application/octet-stream"})
        present = c.head(f"/api/blobs/{digest}")
    assert 507 in statuses and set(statuses) <= {200, 507}, statuses
    assert kept.status_code == 200 and len(kept.json()["messages"]) == statuses.count(200)
    assert upload.status_code == 507 and "no space left" in upload.json()["error"]
    assert present.status_code == 404
    leftovers = [p for p in (tiny_disk / "blobs").rglob("*") if p.is_file()] if (tiny_disk / "blobs").exists() else []
    assert leftovers == []


# -- item 15: the embedded model on a fresh store --------------------------------------------------------------

def test_a_fresh_store_lists_and_shows_the_embedded_model_to_ollama_clients(tmp_path):
    """Issue 14 item 15: /api/tags was empty and /api/show smollm2:135m a 404 until first use. Listing reads the
    package's file and writes nothing; show registers it, as a first chat would."""
    with app_client(tmp_path) as c:
        tags = c.get("/api/tags").json()["models"]
        stored_by_listing = (tmp_path / "models" / "blobs").exists()
        shown = c.post("/api/show", json={"model": MODEL})
        again = c.get("/api/tags").json()["models"]
    assert [m["name"] for m in tags] == [MODEL] and tags[0]["details"]["quantization_level"] == "Q4_1"
    assert not stored_by_listing
    assert shown.status_code == 200 and shown.json()["details"]["family"] == "llama"
    assert [m["name"] for m in again] == [MODEL] and again[0]["size"] > 0
