// Sending, streaming and the page's controls (loaded after app.js, shares its globals).
// Stream shape (OpenAI): "data: {choices:[{delta:{content}, finish_reason}]}\n\n" ... a last chunk with
// "usage" and empty choices (stream_options.include_usage), then "data: [DONE]". An error mid-stream
// arrives as "data: {error: {message}}".
"use strict";

async function send() {
  const input = $("#input");
  const text = input.value;
  if (!text.trim() || state.controller) return;
  state.error = null;
  try {
    if (!state.conv) {
      const d = state.draft;
      const title = text.trim().split("\n")[0].slice(0, 60);
      const conv = await api("POST", "/conversations", { title, model: $("#model").value || null, system: d.system,
        params: d.params });
      history.replaceState(null, "", "#/c/" + conv.id);
      state.conv = { ...conv, messages: [], path: [] };
    }
    state.conv = await api("POST", `/conversations/${state.conv.id}/messages`, { role: "user", content: text });
  } catch (e) {
    showError("Could not save the message: " + e.message);
    return;
  }
  input.value = "";
  autosize();
  loadConversations();
  await generate(state.conv.leaf_id);
}

function showError(text) {
  state.error = text;
  drawThread();
}

function dialog(parentId) {
  // The branch from the root to parentId, oldest first, as chat messages.
  const messages = byId();
  const out = [];
  for (let m = messages.get(parentId); m; m = messages.get(m.parent_id)) out.push({ role: m.role, content: m.content });
  out.reverse();
  const system = state.conv.system?.trim();
  return system ? [{ role: "system", content: system }, ...out] : out;
}

function requestBody(parentId) {
  const body = { model: state.conv.model || $("#model").value || undefined, messages: dialog(parentId), stream: true,
    stream_options: { include_usage: true } };
  for (const p of PARAMS) if (state.conv.params?.[p] != null) body[p] = state.conv.params[p];
  return body;
}

async function generate(parentId) {
  if (state.controller || !state.conv) return;
  const controller = new AbortController();
  state.controller = controller;
  state.error = null;
  const live = { parentId, text: "", el: el("div", "msg assistant streaming"), body: el("div", "body") };
  live.el.append(live.body, el("div", "msg-bar typing", "\u2026"));
  state.live = live;
  setBusy(true);
  drawThread();
  const t = { start: performance.now(), first: null, end: null, chunks: 0 };
  let usage = null, finish = null, failure = null;
  try {
    const res = await fetch("/v1/chat/completions", { method: "POST", headers: headers(true),
      body: JSON.stringify(requestBody(parentId)), signal: controller.signal });
    if (!res.ok) throw new Error(await errorText(res));
    for await (const event of sseEvents(res.body)) {
      if (event.error) throw new Error(event.error.message ?? JSON.stringify(event.error));
      if (event.usage) usage = event.usage;
      const choice = event.choices?.[0];
      if (choice?.delta?.content) {
        t.first ??= performance.now();
        t.chunks++;
        live.text += choice.delta.content;
        scheduleDraw(live);
      }
      if (choice?.finish_reason) finish = choice.finish_reason;
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "cancelled";
    else failure = e.message;
  }
  t.end = performance.now();
  await finishAnswer(live, { usage, finish, failure, t });
}

async function finishAnswer(live, { usage, finish, failure, t }) {
  const conv = state.conv;
  try {
    if (live.text) {
      const s = answerStats(usage, finish, t, conv.model || $("#model").value);
      state.conv = await api("POST", `/conversations/${conv.id}/messages`, { role: "assistant", content: live.text,
        parent_id: live.parentId, stats: s });
    }
  } catch (e) {
    failure = failure ?? "Could not save the answer: " + e.message;
  }
  state.live = null;
  state.controller = null;
  state.error = failure ? "Error " + failure : null;
  setBusy(false);
  drawThread();
  loadModels();
}

function answerStats(usage, finish, t, model) {
  const tokens = usage?.completion_tokens ?? t.chunks;
  const decodeS = t.first != null ? (t.end - t.first) / 1000 : 0;
  const s = { tokens, finish_reason: finish ?? "stop", model, total_s: +((t.end - t.start) / 1000).toFixed(3) };
  if (t.first != null) s.first_token_s = +((t.first - t.start) / 1000).toFixed(3);
  // Decode speed: tokens after the first over the time since the first (prefill is first_token_s).
  if (tokens > 1 && decodeS > 0) s.tokens_per_s = +((tokens - 1) / decodeS).toFixed(2);
  if (usage) {
    s.prompt_tokens = usage.prompt_tokens;
    s.context_used = usage.prompt_tokens + usage.completion_tokens;
  }
  const info = state.models.find((m) => m.name === model);
  if (info?.context_length) s.context_length = info.context_length;
  return s;
}

async function* sseEvents(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buf += decoder.decode(value ?? new Uint8Array(), { stream: !done });
      buf = buf.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
      if (done) return;
    }
  } finally {
    reader.releaseLock();
  }
}

let drawPending = false;
function scheduleDraw(live) {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => {
    drawPending = false;
    if (state.live !== live) return;
    const box = $("#messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    CorralMarkdown.render(live.text, live.body);
    if (atBottom) box.scrollTop = box.scrollHeight;
  });
}

function setBusy(busy) {
  $("#send").hidden = busy;
  $("#stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

// -- settings, models, theme --------------------------------------------------------------------
async function loadModels() {
  try {
    state.models = await api("GET", "/models");
  } catch (e) {
    state.models = [];
    $("#settings-note").textContent = "Could not list models: " + e.message;
  }
  drawHeader();
}

async function saveSettings() {
  const params = {};
  for (const p of PARAMS) {
    const v = $("#p-" + p).value;
    if (v !== "") params[p] = Number(v);
  }
  const system = $("#system").value;
  localStorage.setItem("corral.apiKey", $("#api-key").value);
  if (!state.conv) { state.draft = { ...state.draft, system, params }; return; }
  try {
    state.conv = { ...state.conv, ...(await api("PATCH", "/conversations/" + state.conv.id, { system, params })) };
    $("#settings-note").textContent = "Saved.";
  } catch (e) {
    $("#settings-note").textContent = e.message;
  }
}

async function changeModel() {
  const model = $("#model").value;
  localStorage.setItem("corral.model", model);
  if (!state.conv) { state.draft.model = model; return; }
  state.conv = { ...state.conv, ...(await api("PATCH", "/conversations/" + state.conv.id, { model })) };
}

function applyTheme(theme) {
  if (theme) document.documentElement.dataset.theme = theme;
  const dark = (theme ?? (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light")) === "dark";
  $("#theme-toggle").textContent = dark ? "Light" : "Dark";
}

function toggleTheme() {
  const now = document.documentElement.dataset.theme
    ?? (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light");
  const next = now === "dark" ? "light" : "dark";
  localStorage.setItem("corral.theme", next);
  applyTheme(next);
}

async function exportAll() {
  const res = await fetch("/corral/api/export", { headers: headers(false) });
  const url = URL.createObjectURL(await res.blob());
  const a = el("a");
  a.href = url;
  a.download = "corral-chats.json";
  a.click();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

async function importFile(file) {
  const res = await fetch("/corral/api/import", { method: "POST", headers: headers(true), body: await file.text() });
  if (!res.ok) showError("Import failed: " + (await errorText(res)));
  await loadConversations();
}

function autosize() {
  const input = $("#input");
  input.style.height = "auto";
  input.style.height = Math.min(input.scrollHeight, 240) + "px";
}

function wire() {
  $("#composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("#input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("#input").addEventListener("input", autosize);
  $("#stop").addEventListener("click", () => state.controller?.abort());
  $("#new-chat").addEventListener("click", () => { if (!state.controller) { newChat(); toggleSidebar(false); } });
  let timer = null;
  $("#search").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(loadConversations, 200); });
  $("#open-sidebar").addEventListener("click", () => toggleSidebar(true));
  $("#close-sidebar").addEventListener("click", () => toggleSidebar(false));
  $("#scrim").addEventListener("click", () => toggleSidebar(false));
  $("#settings-toggle").addEventListener("click", () => {
    const s = $("#settings");
    s.hidden = !s.hidden;
    $("#settings-toggle").setAttribute("aria-expanded", String(!s.hidden));
  });
  for (const id of ["#system", "#api-key", ...PARAMS.map((p) => "#p-" + p)]) $(id).addEventListener("change", saveSettings);
  $("#model").addEventListener("change", changeModel);
  $("#theme-toggle").addEventListener("click", toggleTheme);
  $("#export").addEventListener("click", exportAll);
  window.addEventListener("hashchange", () => {
    const m = /^#\/c\/([\w-]+)$/.exec(location.hash);
    if (m && m[1] !== state.conv?.id) openConversation(m[1]);
  });
  $("#import").addEventListener("change", (e) => { if (e.target.files[0]) importFile(e.target.files[0]); e.target.value = ""; });
}

async function start() {
  applyTheme(localStorage.getItem("corral.theme"));
  if (matchMedia("(max-width: 760px)").matches) $("#input").placeholder = "Message";
  wire();
  state.draft.model = localStorage.getItem("corral.model");
  await loadModels();
  if (!state.draft.model || !state.models.some((m) => m.name === state.draft.model)) {
    state.draft.model = state.models[0]?.name ?? null;
  }
  const m = /^#\/c\/([\w-]+)$/.exec(location.hash);
  if (m) await openConversation(m[1]);
  else drawAll();
  await loadConversations().catch((e) => showError("Could not list chats: " + e.message));
  document.body.dataset.ready = "1";
}

start();
