"""The chat page's conversations: one SQLite file, ``$CORRAL_HOME/webui.sqlite3``.

Messages form a tree so that editing a past user message or regenerating an answer adds a
sibling instead of overwriting history; each conversation remembers the leaf it shows, and the
visible thread is the path root -> leaf. Shapes (what every public method returns):

    conversation: {id, title, model, system, params: {temperature?, top_p?, max_tokens?, seed?},
                   created, updated, leaf_id}
    message:      {id, conversation_id, parent_id, role, content, created, stats: {...}}

One connection shared by all threads behind a lock (FastAPI runs sync work in a thread pool);
WAL mode so a reader in another process (a backup, `sqlite3` on the command line) never blocks us.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from corral.errors import CorralError

SCHEMA_VERSION = 1
EXPORT_FORMAT = "corral-webui"
ROLES = ("system", "user", "assistant", "tool")
MAX_TITLE = 200
MAX_CONTENT = 1 << 20  # 1 MiB of text per message
MAX_SYSTEM = 64 << 10
MAX_IMPORT_MESSAGES = 100_000
MAX_STATS_DEPTH = 8
_SURROGATE = re.compile("[\ud800-\udfff]")
# name -> (type, low, high); None bounds are open. Validated on every write and on import.
PARAM_LIMITS: dict[str, tuple[type, float | None, float | None]] = {
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    "max_tokens": (int, 1, 1 << 20),
    "seed": (int, 0, (1 << 63) - 1),
}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY, title TEXT NOT NULL, model TEXT, system TEXT NOT NULL DEFAULT '',
    params TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL, updated REAL NOT NULL, leaf_id TEXT);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    parent_id TEXT REFERENCES messages(id) ON DELETE CASCADE,
    role TEXT NOT NULL, content TEXT NOT NULL, created REAL NOT NULL, stats TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, created);
CREATE INDEX IF NOT EXISTS messages_by_parent ON messages(parent_id);
"""


class ConversationError(CorralError, ValueError):
    """A request to the conversation store is malformed (HTTP 400)."""


class ConversationNotFound(CorralError, LookupError):
    """No conversation or message with that id (HTTP 404)."""


def default_path() -> Path:
    from corral.store.store import default_home

    return default_home() / "webui.sqlite3"


class ConversationStore:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        with self._lock:
            self._db.executescript(_SCHEMA)  # idempotent; executescript commits on its own, so not in _tx
        with self._tx() as db:
            row = db.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise ConversationError(f"{self.path.name} has schema version {row[0]}; this Corral reads "
                                        f"up to {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock: all of it is written or none (import relies on this)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error:  # a full disk fails the commit: leave the file as it was before
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    # -- conversations ----------------------------------------------------------------------------
    def list(self, query: str | None = None, limit: int = 500) -> list[dict]:
        """Newest first; `query` matches titles and message content (case-insensitive substring)."""
        sql = "SELECT * FROM conversations"
        args: list[Any] = []
        if query:
            pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            sql += (" WHERE title LIKE ? ESCAPE '\\' OR id IN (SELECT conversation_id FROM messages"
                    " WHERE content LIKE ? ESCAPE '\\')")
            args += [pattern, pattern]
        sql += " ORDER BY updated DESC LIMIT ?"
        with self._lock:
            return [_conversation(r) for r in self._db.execute(sql, [*args, int(limit)])]

    def create(self, title: str = "New chat", model: str | None = None, system: str = "",
               params: dict | None = None) -> dict:
        now = time.time()
        row = (uuid.uuid4().hex, _title(title), _model(model), _system(system), json.dumps(_params(params or {})),
               now, now, None)
        with self._tx() as db:
            db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
        return self.conversation(row[0])

    def conversation(self, conv_id: str) -> dict:
        with self._lock:
            row = self._db.execute("SELECT * FROM conversations WHERE id = ?", (conv_id,)).fetchone()
        if row is None:
            raise ConversationNotFound(f"no conversation {conv_id!r}")
        return _conversation(row)

    def get(self, conv_id: str) -> dict:
        """The conversation with every message of its tree (oldest first) and the visible path of ids."""
        conv = self.conversation(conv_id)
        with self._lock:
            rows = self._db.execute("SELECT * FROM messages WHERE conversation_id = ? ORDER BY created, rowid",
                                    (conv_id,)).fetchall()
        conv["messages"] = [_message(r) for r in rows]
        conv["path"] = _path(conv["messages"], conv["leaf_id"])
        return conv

    def update(self, conv_id: str, **fields: Any) -> dict:
        """Set any of title, model, system, params (params replace the old ones as a whole)."""
        checks = {"title": _title, "model": _model, "system": _system,
                  "params": lambda p: json.dumps(_params(p))}
        unknown = set(fields) - set(checks)
        if unknown:
            raise ConversationError(f"unknown field(s) {sorted(unknown)}; expected some of {sorted(checks)}")
        values = {k: checks[k](v) for k, v in fields.items()}
        self.conversation(conv_id)
        if values:
            sets = ", ".join(f"{k} = ?" for k in values)
            with self._tx() as db:
                db.execute(f"UPDATE conversations SET {sets}, updated = ? WHERE id = ?",
                           [*values.values(), time.time(), conv_id])
        return self.conversation(conv_id)

    def delete(self, conv_id: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM conversations WHERE id = ?", (conv_id,)).rowcount == 0:
                raise ConversationNotFound(f"no conversation {conv_id!r}")

    # -- messages ---------------------------------------------------------------------------------
    def add_message(self, conv_id: str, role: str, content: str, *, parent_id: str | None | object = ...,
                    stats: dict | None = None) -> dict:
        """Append under `parent_id` (default: the current leaf; None: a new root); it becomes the leaf."""
        conv = self.conversation(conv_id)
        parent = conv["leaf_id"] if parent_id is ... else parent_id
        msg = {"id": uuid.uuid4().hex, "conversation_id": conv_id, "parent_id": parent, "role": _role(role),
               "content": _content(content), "created": time.time(), "stats": _stats(stats or {})}
        with self._tx() as db:
            if parent is not None:
                self._check_in(db, conv_id, parent)
            _insert_message(db, msg)
            db.execute("UPDATE conversations SET leaf_id = ?, updated = ? WHERE id = ?",
                       (msg["id"], msg["created"], conv_id))
        return msg

    def edit_message(self, conv_id: str, message_id: str, content: str) -> dict:
        """A new sibling of `message_id` (same parent and role) with `content`; the old branch stays."""
        with self._lock:
            old = self._check_in(self._db, conv_id, message_id)
        return self.add_message(conv_id, old["role"], content, parent_id=old["parent_id"])

    def select(self, conv_id: str, message_id: str) -> dict:
        """Show the branch through `message_id`: the leaf becomes its newest descendant along newest children."""
        with self._tx() as db:
            self._check_in(db, conv_id, message_id)
            leaf = message_id
            while (child := db.execute("SELECT id FROM messages WHERE parent_id = ? ORDER BY created DESC, "
                                       "rowid DESC LIMIT 1", (leaf,)).fetchone()) is not None:
                leaf = child[0]
            db.execute("UPDATE conversations SET leaf_id = ? WHERE id = ?", (leaf, conv_id))
        return self.get(conv_id)

    def _check_in(self, db: sqlite3.Connection, conv_id: str, message_id: Any) -> dict:
        if not isinstance(message_id, str):
            raise ConversationError("message id must be a string")
        row = db.execute("SELECT * FROM messages WHERE id = ? AND conversation_id = ?",
                         (message_id, conv_id)).fetchone()
        if row is None:
            raise ConversationNotFound(f"no message {message_id!r} in conversation {conv_id!r}")
        return _message(row)

    # -- export / import --------------------------------------------------------------------------
    def export(self, ids: list[str] | None = None) -> dict:
        """{"format", "version", "conversations": [get(...) without "path"]}; all conversations by default."""
        ids = ids if ids is not None else [c["id"] for c in self.list(limit=1 << 30)]
        convs = []
        for conv_id in ids:
            conv = self.get(conv_id)
            conv.pop("path")
            convs.append(conv)
        return {"format": EXPORT_FORMAT, "version": SCHEMA_VERSION, "conversations": convs}

    def import_(self, data: bytes | str | dict) -> list[str]:
        """Add every conversation of an export under fresh ids; validated wholly before one transaction."""
        convs = _parse_export(data)
        new_ids = []
        with self._tx() as db:
            for conv, messages in convs:
                new_ids.append(conv["id"])
                db.execute("INSERT INTO conversations VALUES (:id, :title, :model, :system, :params, :created,"
                           " :updated, :leaf_id)", {**conv, "params": json.dumps(conv["params"])})
                for msg in messages:
                    _insert_message(db, msg)
        return new_ids


def _insert_message(db: sqlite3.Connection, msg: dict) -> None:
    db.execute("INSERT INTO messages VALUES (:id, :conversation_id, :parent_id, :role, :content, :created, :stats)",
               {**msg, "stats": json.dumps(msg["stats"])})


def _path(messages: list[dict], leaf_id: str | None) -> list[str]:
    parents = {m["id"]: m["parent_id"] for m in messages}
    out = []
    node = leaf_id
    while node is not None and node in parents and len(out) <= len(parents):
        out.append(node)
        node = parents[node]
    return out[::-1]


def _conversation(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["params"] = json.loads(d["params"])
    return d


def _message(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["stats"] = json.loads(d["stats"])
    return d


# -- validation: every user-supplied value passes one of these before it reaches SQL -------------
def _text(value: Any, name: str, limit: int) -> str:
    if not isinstance(value, str):
        raise ConversationError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise ConversationError(f"{name} is {len(value)} characters; the limit is {limit}")
    if "\x00" in value:
        raise ConversationError(f"{name} contains a NUL character")
    if _SURROGATE.search(value):  # JSON's "\ud800" decodes, but SQLite cannot store it as UTF-8
        raise ConversationError(f"{name} holds a lone UTF-16 surrogate, which is not text")
    return value


def _title(value: Any) -> str:
    title = _text(value, "title", MAX_TITLE).strip()
    return title or "New chat"


def _model(value: Any) -> str | None:
    return None if value is None else _text(value, "model", 350)


def _system(value: Any) -> str:
    return _text(value, "system", MAX_SYSTEM)


def _role(value: Any) -> str:
    if value not in ROLES:
        raise ConversationError(f"role must be one of {list(ROLES)}, got {value!r}")
    return value


def _content(value: Any) -> str:
    return _text(value, "content", MAX_CONTENT)


def _stats(value: Any) -> dict:
    if not isinstance(value, dict):
        raise ConversationError("stats must be a JSON object")
    if _depth(value) > MAX_STATS_DEPTH:  # a deep one stores fine and then breaks every read of the chat
        raise ConversationError(f"stats is nested deeper than {MAX_STATS_DEPTH} levels")
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ConversationError(f"stats cannot be stored: {e}") from None
    if len(text) > 4096 or _SURROGATE.search(text):
        raise ConversationError("stats must be at most 4096 bytes of text")
    return value


def _depth(value: Any) -> int:
    """Levels of objects and arrays, counted without recursion (the value may be hostile)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_STATS_DEPTH:
                stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _params(value: Any) -> dict:
    """Sampling parameters; None values mean "the model's default" and are dropped."""
    if not isinstance(value, dict):
        raise ConversationError("params must be a JSON object")
    out = {}
    for key, v in value.items():
        if key not in PARAM_LIMITS:
            raise ConversationError(f"unknown parameter {key!r}; expected some of {sorted(PARAM_LIMITS)}")
        if v is None:
            continue
        kind, low, high = PARAM_LIMITS[key]
        ok = isinstance(v, int | float) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
        if not ok or v != v or not (low <= v <= high):
            raise ConversationError(f"parameter {key} must be a{'n integer' if kind is int else ' number'} "
                                    f"in [{low}, {high}], got {v!r}")
        out[key] = kind(v)
    return out


# -- import: the whole file is checked and its ids remapped before anything is written -----------
def _parse_export(data: bytes | str | dict) -> list[tuple[dict, list[dict]]]:
    if isinstance(data, bytes | str):
        try:
            data = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversationError(f"import is not valid JSON: {e}") from None
        except RecursionError:
            raise ConversationError("import is nested too deeply to be a chat export") from None
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise ConversationError(f'import must be a JSON object with "format": "{EXPORT_FORMAT}"')
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SCHEMA_VERSION:
        raise ConversationError(f"import version must be an integer from 1 to {SCHEMA_VERSION}, got {version!r}")
    convs = data.get("conversations")
    if not isinstance(convs, list):
        raise ConversationError('import needs a "conversations" list')
    if sum(len(c.get("messages") or []) for c in convs if isinstance(c, dict)) > MAX_IMPORT_MESSAGES:
        raise ConversationError(f"import holds more than {MAX_IMPORT_MESSAGES} messages")
    out = []
    for i, conv in enumerate(convs):
        try:
            out.append(_parse_conversation(conv))
        except ConversationError as e:
            raise ConversationError(f"conversations[{i}]: {e}") from None
    return out


def _parse_conversation(conv: Any) -> tuple[dict, list[dict]]:
    if not isinstance(conv, dict):
        raise ConversationError("must be a JSON object")
    now = time.time()
    row = {"id": uuid.uuid4().hex, "title": _title(conv.get("title", "Imported chat")),
           "model": _model(conv.get("model")), "system": _system(conv.get("system", "")),
           "params": _params(conv.get("params") or {}), "created": _time(conv.get("created", now), "created"),
           "updated": _time(conv.get("updated", now), "updated")}
    messages = conv.get("messages", [])
    if not isinstance(messages, list):
        raise ConversationError("messages must be a list")
    new_ids: dict[str, str] = {}
    parsed = []
    for j, msg in enumerate(messages):
        try:
            if not isinstance(msg, dict):
                raise ConversationError("must be a JSON object")
            old = msg.get("id")
            if not isinstance(old, str) or old in new_ids:
                raise ConversationError(f"id must be a string unique in its conversation, got {old!r}")
            new_ids[old] = uuid.uuid4().hex
            parsed.append({"id": new_ids[old], "conversation_id": row["id"], "parent_id": msg.get("parent_id"),
                           "role": _role(msg.get("role")), "content": _content(msg.get("content")),
                           "created": _time(msg.get("created", now), "created"),
                           "stats": _stats(msg.get("stats") or {})})
        except ConversationError as e:
            raise ConversationError(f"messages[{j}]: {e}") from None
    for j, msg in enumerate(parsed):
        if msg["parent_id"] is not None:
            if msg["parent_id"] not in new_ids:
                raise ConversationError(f"messages[{j}]: parent_id {msg['parent_id']!r} is not a message here")
            msg["parent_id"] = new_ids[msg["parent_id"]]
    leaf = conv.get("leaf_id")
    if leaf is not None and leaf not in new_ids:
        raise ConversationError(f"leaf_id {leaf!r} is not a message here")
    row["leaf_id"] = new_ids.get(leaf) if leaf is not None else None
    return row, _parents_first(parsed)


def _parents_first(messages: list[dict]) -> list[dict]:
    """Order so every parent precedes its children (the foreign key checks each insert); a cycle is refused."""
    children: dict[str | None, list[dict]] = {}
    for m in messages:
        children.setdefault(m["parent_id"], []).append(m)
    out, todo = [], list(children.get(None, []))
    while todo:
        m = todo.pop()
        out.append(m)
        todo.extend(children.get(m["id"], []))
    if len(out) != len(messages):
        raise ConversationError("messages: parent_id links form a cycle")
    return out


def _time(value: Any, name: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1e11:
        raise ConversationError(f"{name} must be a Unix time in seconds, got {value!r}")
    return float(value)
