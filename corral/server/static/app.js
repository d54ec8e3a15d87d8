// The Corral chat page. State lives on the server (/corral/api/...); this file draws it, streams
// answers from /v1/chat/completions (SSE over fetch) and saves each finished or stopped answer.
// Model text only ever reaches the DOM through textContent (markdown.js); see docs/webui.md.
"use strict";

const $ = (sel) => document.querySelector(sel);
const PARAMS = ["temperature", "top_p", "max_tokens", "seed"];
const state = {
  conversations: [],
  conv: null, // {id, title, model, system, params, messages: [...], path: [ids], leaf_id}
  models: [],
  draft: { model: null, system: "", params: {} }, // settings before the first message creates a chat
  controller: null, // AbortController of the answer being streamed
  live: null, // {parentId, text, el} while streaming
  error: null, // {text} shown under the thread until the next send
  editing: null, // message id whose edit box is open
};

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, cls, onClick, title) {
  const b = el("button", cls, label);
  b.type = "button";
  if (title) { b.title = title; b.setAttribute("aria-label", title); }
  b.addEventListener("click", onClick);
  return b;
}

// -- server calls -------------------------------------------------------------------------------
function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = localStorage.getItem("corral.apiKey");
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorText(res) {
  let detail = res.statusText;
  try {
    const body = await res.json();
    const e = body.error ?? body.detail ?? body;
    detail = typeof e === "string" ? e : e.message ?? JSON.stringify(e);
  } catch (_) { /* not JSON: keep the status text */ }
  return `${res.status}: ${detail}`;
}

async function api(method, path, body) {
  const res = await fetch("/corral/api" + path, {
    method, headers: headers(body !== undefined), body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!res.ok) throw new Error(await errorText(res));
  return res.status === 204 ? null : res.json();
}

// -- sidebar ------------------------------------------------------------------------------------
async function loadConversations() {
  const q = $("#search").value.trim();
  state.conversations = await api("GET", "/conversations" + (q ? "?q=" + encodeURIComponent(q) : ""));
  drawSidebar();
}

function drawSidebar() {
  const list = $("#conv-list");
  list.replaceChildren();
  for (const c of state.conversations) {
    const li = el("li", c.id === state.conv?.id ? "active" : "");
    li.dataset.id = c.id;
    const title = el("span", "conv-name", c.title);
    title.addEventListener("click", () => openConversation(c.id));
    li.appendChild(title);
    li.appendChild(button("\u270E", "icon rename", () => startRename(li, c), "Rename"));
    const del = button("\u00D7", "icon delete", async () => {
      if (!del.classList.contains("confirm")) { del.classList.add("confirm"); del.textContent = "Delete?"; return; }
      await api("DELETE", "/conversations/" + c.id);
      if (state.conv?.id === c.id) newChat();
      await loadConversations();
    }, "Delete");
    li.appendChild(del);
    list.appendChild(li);
  }
  if (!state.conversations.length) list.appendChild(el("li", "none", $("#search").value ? "No matches" : "No chats yet"));
}

function startRename(li, conv) {
  const input = el("input", "rename-input");
  input.value = conv.title;
  li.replaceChildren(input);
  input.focus();
  input.select();
  const finish = async (save) => {
    input.onblur = null;
    if (save && input.value.trim() && input.value !== conv.title) {
      await api("PATCH", "/conversations/" + conv.id, { title: input.value });
      if (state.conv?.id === conv.id) state.conv.title = input.value.trim();
      drawHeader();
    }
    await loadConversations();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); finish(true); }
    if (e.key === "Escape") finish(false);
  });
  input.onblur = () => finish(true);
}

function toggleSidebar(open) {
  $("#app").classList.toggle("sidebar-open", open);
  $("#scrim").hidden = !open;
}

// -- conversations ------------------------------------------------------------------------------
async function openConversation(id) {
  if (state.controller) return;
  try {
    state.conv = await api("GET", "/conversations/" + id);
  } catch (e) {
    newChat();
    return;
  }
  state.error = null;
  state.editing = null;
  history.replaceState(null, "", "#/c/" + id);
  toggleSidebar(false);
  drawAll();
}

function newChat() {
  state.conv = null;
  state.error = null;
  state.editing = null;
  history.replaceState(null, "", location.pathname);
  drawAll();
  $("#input").focus();
}

function current() {
  return state.conv ?? { model: state.draft.model, system: state.draft.system, params: state.draft.params };
}

function byId() {
  return new Map((state.conv?.messages ?? []).map((m) => [m.id, m]));
}

function siblingsOf(msg) {
  return state.conv.messages.filter((m) => m.parent_id === msg.parent_id);
}

// -- drawing ------------------------------------------------------------------------------------
function drawAll() {
  drawSidebar();
  drawHeader();
  drawSettings();
  drawThread();
}

function drawHeader() {
  $("#conv-title").textContent = state.conv?.title ?? "New chat";
  const select = $("#model");
  const want = current().model ?? select.value;
  select.replaceChildren();
  for (const m of state.models) select.appendChild(new Option(m.name, m.name));
  if (want && !state.models.some((m) => m.name === want)) select.appendChild(new Option(want + " (missing)", want));
  if (want) select.value = want;
}

function drawSettings() {
  const c = current();
  $("#system").value = c.system ?? "";
  for (const p of PARAMS) $("#p-" + p).value = c.params?.[p] ?? "";
  $("#api-key").value = localStorage.getItem("corral.apiKey") ?? "";
}

function drawThread() {
  const box = $("#messages");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  box.replaceChildren();
  const messages = byId();
  const path = state.conv?.path ?? [];
  if (!path.length && !state.live && !state.error) {
    const empty = el("div", "empty");
    empty.id = "empty";
    empty.append(el("h1", "", "Corral"), el("p", "", "Chat with the models in your store. Everything stays on this machine."));
    box.appendChild(empty);
  }
  for (const id of path) box.appendChild(drawMessage(messages.get(id)));
  const last = messages.get(path[path.length - 1]);
  if (last?.role === "user" && !state.live) {
    const retry = el("div", "retry");
    retry.appendChild(button("Generate answer", "", () => generate(last.id)));
    box.appendChild(retry);
  }
  if (state.live) box.appendChild(state.live.el);
  if (state.error) box.appendChild(el("div", "msg error", state.error));
  if (atBottom || state.live) box.scrollTop = box.scrollHeight;
}

function drawMessage(msg) {
  const node = el("div", "msg " + msg.role);
  node.dataset.id = msg.id;
  const body = el("div", "body");
  if (state.editing === msg.id) node.appendChild(editBox(msg));
  else {
    if (msg.role === "assistant") CorralMarkdown.render(msg.content, body);
    else body.textContent = msg.content;
    node.appendChild(body);
  }
  const bar = el("div", "msg-bar");
  const sibs = siblingsOf(msg);
  if (sibs.length > 1) bar.appendChild(branchSwitcher(msg, sibs));
  if (msg.role === "assistant") {
    bar.appendChild(stats(msg.stats));
    bar.appendChild(button("Copy", "small copy-msg", (e) => CorralMarkdown.copyText(msg.content, e.target)));
    bar.appendChild(button("Regenerate", "small regen", () => generate(msg.parent_id)));
  } else if (msg.role === "user" && state.editing !== msg.id) {
    bar.appendChild(button("Edit", "small edit", () => { state.editing = msg.id; drawThread(); }));
  }
  if (state.controller) for (const b of bar.querySelectorAll("button:not(.copy-msg)")) b.disabled = true;
  node.appendChild(bar);
  return node;
}

function branchSwitcher(msg, sibs) {
  const i = sibs.findIndex((m) => m.id === msg.id);
  const box = el("span", "branch");
  const go = (j) => async () => {
    if (state.controller) return;
    state.conv = await api("POST", `/conversations/${state.conv.id}/select`, { message_id: sibs[j].id });
    drawThread();
  };
  const prev = button("<", "small prev", go(i - 1), "Previous branch");
  const next = button(">", "small next", go(i + 1), "Next branch");
  prev.disabled = i === 0;
  next.disabled = i === sibs.length - 1;
  box.append(prev, el("span", "count", `${i + 1}/${sibs.length}`), next);
  return box;
}

function stats(s) {
  const parts = [];
  if (s?.tokens_per_s != null) parts.push(`${s.tokens_per_s.toFixed(1)} tok/s`);
  if (s?.tokens != null) parts.push(`${s.tokens} tokens`);
  if (s?.context_used != null) {
    const of = s.context_length ? ` / ${s.context_length} (${Math.round((100 * s.context_used) / s.context_length)}%)` : "";
    parts.push(`context ${s.context_used}${of}`);
  }
  if (s?.finish_reason === "cancelled") parts.push("stopped");
  else if (s?.finish_reason === "length") parts.push("hit the token limit");
  else if (s?.finish_reason === "content_filter") parts.push("cut by the content guard");
  const node = el("span", "stats", parts.join(" \u00B7 "));
  if (s?.model) node.title = s.model;
  return node;
}

function editBox(msg) {
  const form = el("form", "edit-box");
  const area = el("textarea");
  area.value = msg.content;
  area.rows = Math.min(12, msg.content.split("\n").length + 1);
  const save = el("button", "primary", "Save & send");
  save.type = "submit";
  form.append(area, save, button("Cancel", "", () => { state.editing = null; drawThread(); }));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!area.value.trim() || state.controller) return;
    state.editing = null;
    state.conv = await api("POST", `/conversations/${state.conv.id}/messages/${msg.id}/edit`, { content: area.value });
    await generate(state.conv.leaf_id);
  });
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); form.requestSubmit(); }
  });
  setTimeout(() => area.focus(), 0);
  return form;
}
