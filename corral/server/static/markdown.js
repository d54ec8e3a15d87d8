// Markdown -> DOM for model output. Every piece of text becomes a Text node or textContent; no
// string is ever parsed as HTML (no innerHTML anywhere), so `<img onerror=...>` in an answer is
// shown as those characters. Links keep only http(s) and mailto targets.
// Covers what chat models emit: fenced code (with a small highlighter and a copy button),
// headings, lists (nested by indentation), block quotes, tables, rules, and inline code,
// bold, italic, strike-through and links. An unclosed fence (mid-stream) renders as code so far.
"use strict";

(function () {
  const FENCE = /^\s*(```+|~~~+)\s*([\w+#.-]*)[^\n]*$/;
  const HEADING = /^(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const TABLE_SEP = /^\s*\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*$/;
  const QUOTE = /^\s*>\s?(.*)$/;

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // -- blocks ---------------------------------------------------------------------------------
  function renderBlocks(lines, parent) {
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (!line.trim()) { i++; continue; }
      if ((m = FENCE.exec(line))) { i = codeBlock(lines, i, m, parent); continue; }
      if ((m = HEADING.exec(line))) {
        const h = el("h" + m[1].length);
        inline(m[2], h);
        parent.appendChild(h);
        i++; continue;
      }
      if (RULE.test(line)) { parent.appendChild(el("hr")); i++; continue; }
      if (QUOTE.test(line)) {
        const body = [];
        while (i < lines.length && (m = QUOTE.exec(lines[i]))) { body.push(m[1]); i++; }
        const q = el("blockquote");
        renderBlocks(body, q);
        parent.appendChild(q);
        continue;
      }
      if (ITEM.test(line)) { i = list(lines, i, parent); continue; }
      if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].includes("-")) {
        i = table(lines, i, parent); continue;
      }
      i = paragraph(lines, i, parent);
    }
  }

  function startsBlock(line) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
  }

  function paragraph(lines, i, parent) {
    const p = el("p");
    let first = true;
    while (i < lines.length && lines[i].trim() && (first || !startsBlock(lines[i]))) {
      if (!first) p.appendChild(el("br"));
      inline(lines[i].trim(), p);
      first = false;
      i++;
    }
    parent.appendChild(p);
    return i;
  }

  function codeBlock(lines, i, m, parent) {
    const fence = m[1], lang = (m[2] || "").toLowerCase();
    const body = [];
    i++;
    while (i < lines.length && !lines[i].trim().startsWith(fence)) { body.push(lines[i]); i++; }
    const text = body.join("\n");
    const wrap = el("div", "code-block");
    const head = el("div", "code-head");
    head.appendChild(el("span", "code-lang", lang || "text"));
    const copy = el("button", "copy-code", "Copy");
    copy.type = "button";
    copy.addEventListener("click", () => copyText(text, copy));
    head.appendChild(copy);
    const pre = el("pre");
    const code = el("code", lang ? "lang-" + lang.replace(/[^\w-]/g, "") : "");
    code.appendChild(highlight(text, lang));
    pre.appendChild(code);
    wrap.append(head, pre);
    parent.appendChild(wrap);
    return i + 1; // past the closing fence (or the end)
  }

  function list(lines, i, parent) {
    const first = ITEM.exec(lines[i]);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const node = el(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
    while (i < lines.length) {
      const m = ITEM.exec(lines[i]);
      if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
      const body = [m[3]];
      i++;
      // The item's own continuation: more-indented lines (nested lists included) and lazy text lines.
      while (i < lines.length && lines[i].trim()) {
        const sub = ITEM.exec(lines[i]);
        const lead = lines[i].length - lines[i].trimStart().length;
        if (sub && lead <= indent) break;
        if (!sub && lead <= indent && startsBlock(lines[i])) break;
        body.push(lead > indent ? lines[i].slice(Math.min(lead, indent + 2)) : lines[i].trim());
        i++;
      }
      const li = el("li");
      if (body.length === 1) inline(body[0], li); else renderBlocks(body, li);
      node.appendChild(li);
      // A blank line between items of the same list keeps the list going.
      if (i + 1 < lines.length && !lines[i]?.trim()) {
        const next = ITEM.exec(lines[i + 1]);
        if (next && next[1].length === indent) i++;
      }
    }
    parent.appendChild(node);
    return i;
  }

  function cells(line) {
    let s = line.trim();
    if (s.startsWith("|")) s = s.slice(1);
    if (s.endsWith("|")) s = s.slice(0, -1);
    return s.split("|").map((c) => c.trim());
  }

  function table(lines, i, parent) {
    const wrap = el("div", "table-wrap");
    const t = el("table");
    const headRow = el("tr");
    for (const c of cells(lines[i])) { const th = el("th"); inline(c, th); headRow.appendChild(th); }
    t.appendChild(el("thead")).appendChild(headRow);
    const tbody = t.appendChild(el("tbody"));
    i += 2;
    while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
      const tr = el("tr");
      for (const c of cells(lines[i])) { const td = el("td"); inline(c, td); tr.appendChild(td); }
      tbody.appendChild(tr);
      i++;
    }
    wrap.appendChild(t);
    parent.appendChild(wrap);
    return i;
  }

  // -- inline ---------------------------------------------------------------------------------
  // Earliest match wins; the text before it is a Text node; emphasis recurses on its content.
  const INLINE = [
    ["code", /(`+)([\s\S]+?)\1/],
    ["link", /\[([^\]\n]+)\]\(([^)\s]+)\)/],
    // Underscores only emphasise at word edges, so snake_case and window.__x stay plain text.
    ["strong", /\*\*(?=\S)([\s\S]+?\S)\*\*|(?<!\w)__(?=\S)([\s\S]+?\S)__(?!\w)/],
    ["del", /~~(?=\S)([\s\S]+?\S)~~/],
    ["em", /\*(?=[^\s*])([\s\S]*?[^\s*])\*|(?<!\w)_(?=[^\s_])([\s\S]*?[^\s_])_(?!\w)/],
    ["url", /\bhttps?:\/\/[^\s<>()]+[^\s<>().,;:!?'"]/],
  ];

  function inline(text, parent) {
    while (text) {
      let best = null;
      for (const [kind, re] of INLINE) {
        const m = re.exec(text);
        if (m && (best === null || m.index < best.m.index)) best = { kind, m };
      }
      if (!best) { parent.appendChild(document.createTextNode(text)); return; }
      const { kind, m } = best;
      if (m.index) parent.appendChild(document.createTextNode(text.slice(0, m.index)));
      if (kind === "code") parent.appendChild(el("code", "inline", m[2].replace(/^ (.*) $/, "$1")));
      else if (kind === "link") link(m[1], m[2], parent);
      else if (kind === "url") link(m[0], m[0], parent);
      else {
        const node = el(kind);
        inline(m[1] ?? m[2], node);
        parent.appendChild(node);
      }
      text = text.slice(m.index + m[0].length);
    }
  }

  function link(label, href, parent) {
    if (!/^(https?:\/\/|mailto:)/i.test(href)) { parent.appendChild(document.createTextNode(label)); return; }
    const a = el("a");
    inline(label, a);
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    parent.appendChild(a);
  }

  // -- highlighting ---------------------------------------------------------------------------
  const KEYWORDS = new Set((
    "as assert async await break case catch class const continue def default del do elif else enum except export " +
    "extends false final finally fn for from func function go if impl import in instanceof interface is lambda let " +
    "match mod mut new nil none not null or and package pass private protected pub public raise return self static " +
    "struct super switch this throw throws true try type typeof use var void while with yield None True False " +
    "int float double char bool string str long short unsigned signed auto template typename namespace using " +
    "echo fi then done esac local export readonly select from where insert update delete create table into values"
  ).split(" "));
  const HASH_COMMENTS = new Set(["python", "py", "bash", "sh", "shell", "zsh", "console", "ruby", "rb", "yaml", "yml",
    "toml", "r", "perl", "makefile", "make", "dockerfile", "ini", "conf", "text", ""]);
  const SLASH_FREE = new Set(["python", "py", "bash", "sh", "shell", "zsh", "ruby", "rb", "yaml", "yml", "toml", "r",
    "ini", "sql"]);

  function highlight(text, lang) {
    const frag = document.createDocumentFragment();
    if (text.length > 200000) { frag.appendChild(document.createTextNode(text)); return frag; }
    const parts = [];
    if (!SLASH_FREE.has(lang)) parts.push("(\\/\\/[^\\n]*|\\/\\*[\\s\\S]*?(?:\\*\\/|$))");
    else parts.push("((?!))"); // every alternative keeps its group so the numbers below stay fixed
    parts.push(HASH_COMMENTS.has(lang) ? "(#[^\\n]*)" : "((?!))");
    parts.push(lang === "sql" ? "(--[^\\n]*)" : "((?!))");
    parts.push("(\"\"\"[\\s\\S]*?(?:\"\"\"|$)|'''[\\s\\S]*?(?:'''|$)|\"(?:\\\\.|[^\"\\\\\\n])*\"?|'(?:\\\\.|[^'\\\\\\n])*'?|" +
      "`(?:\\\\.|[^`\\\\])*`?)");
    parts.push("(\\b(?:0[xX][\\da-fA-F_]+|\\d[\\d_]*(?:\\.\\d+)?(?:[eE][+-]?\\d+)?)\\b)");
    parts.push("([A-Za-z_$][\\w$]*)");
    const re = new RegExp(parts.join("|"), "g");
    let last = 0, m;
    while ((m = re.exec(text)) !== null) {
      let cls = null;
      if (m[1] || m[2] || m[3]) cls = "tok-comment";
      else if (m[4]) cls = "tok-string";
      else if (m[5]) cls = "tok-number";
      else if (m[6] && KEYWORDS.has(m[6])) cls = "tok-keyword";
      else if (m[6] && text[re.lastIndex] === "(") cls = "tok-call";
      if (!cls) continue;
      if (m.index > last) frag.appendChild(document.createTextNode(text.slice(last, m.index)));
      frag.appendChild(el("span", cls, m[0]));
      last = re.lastIndex;
    }
    if (last < text.length) frag.appendChild(document.createTextNode(text.slice(last)));
    return frag;
  }

  function copyText(text, button) {
    const done = (ok) => {
      button.textContent = ok ? "Copied" : "Copy failed";
      setTimeout(() => { button.textContent = "Copy"; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(() => done(true), () => done(fallbackCopy(text)));
    } else done(fallbackCopy(text));
  }

  function fallbackCopy(text) {
    const area = el("textarea");
    area.value = text;
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    let ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    area.remove();
    return ok;
  }

  function render(text, target) {
    target.replaceChildren();
    renderBlocks(String(text).replace(/\r\n?/g, "\n").split("\n"), target);
  }

  window.CorralMarkdown = { render, highlight, copyText };
})();
