"""The chat page in Debian's Chromium against a live `corral serve` with the embedded SmolLM2 model.

Contexts bypass the page's Content-Security-Policy: Playwright's wait_for_function evaluates strings,
which the policy forbids, and the XSS test must hold on the renderer alone, without that second wall
(test_web_api.py checks the policy header itself).

One server for the module (CORRAL_HOME in a temp dir, two store entries: smollm2:135m and a copy);
each test gets a fresh browser page. Screenshots go to docs/screenshots/ (overwritten each run).
"""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]
playwright = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).parents[2]
SHOTS = ROOT / "docs" / "screenshots"
COPY = "smollm2-copy:latest"
FAST = {"temperature": 0, "seed": 7, "max_tokens": 24}  # short greedy answers keep the file quick on a CPU


def _wait_port(port_file: Path, proc: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    """The port `corral serve --port 0 --port-file` bound: never a guessed "free" port another process can
    take before the server binds it (issue 14 item 22)."""
    deadline = time.monotonic() + timeout
    while not port_file.is_file():
        if proc.poll() is not None:
            raise RuntimeError(f"corral serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError("corral serve did not report its port")
        time.sleep(0.1)
    return int(port_file.read_text())


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"corral serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as res:
                if res.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("corral serve did not become healthy")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from corral.store import Store
    from corral.store.load import ensure_default

    home = tmp_path_factory.mktemp("webui-home")
    store = Store(home)
    ensure_default(store)
    store.copy("smollm2:135m", COPY)  # a second store entry (shares the blob) for the model picker
    log = open(home / "serve.log", "w")
    env = {**os.environ, "CORRAL_HOME": str(home)}
    env.pop("CORRAL_API_KEY", None)
    env.pop("CORRAL_HOST", None)
    proc = subprocess.Popen([sys.executable, "-m", "corral", "serve", "--host", "127.0.0.1", "--port", "0",
                             "--port-file", str(home / "port"), "--context", "2048", "--parallel", "2",
                             "--model", "smollm2:135m"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{_wait_port(home / 'port', proc, home / 'serve.log')}"
        _wait_healthy(url, proc, home / "serve.log")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=server, color_scheme="light",
                                  bypass_csp=True)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.errors = errors
    pg.set_default_timeout(60_000)
    yield pg
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def _api(server: str, method: str, path: str, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(server + "/corral/api" + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as res:
        return json.loads(res.read() or b"null")


def _open(page, conv_id: str | None = None) -> None:
    page.goto("/" + (f"#/c/{conv_id}" if conv_id else ""))
    page.wait_for_selector("body[data-ready='1']")


def _send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def _answer_ids(page) -> list[str]:
    return page.evaluate("[...document.querySelectorAll('.msg.assistant[data-id]')].map(e => e.dataset.id)")


def _wait_answer(page, before: list[str]) -> None:
    """Until an answer not in `before` (ids on screen before the action) is saved and nothing streams."""
    page.wait_for_function("(before) => !document.querySelector('.msg.streaming') && [...document.querySelectorAll("
                           "'.msg.assistant[data-id]')].some(e => !before.includes(e.dataset.id))", arg=before,
                           timeout=120_000)


def test_answer_streams_in_and_survives_reload(page, server):
    _open(page)
    page.click("#settings-toggle")
    page.fill("#p-max_tokens", "40")
    page.fill("#p-temperature", "0")
    page.locator("#p-temperature").dispatch_event("change")
    page.locator("#p-max_tokens").dispatch_event("change")
    # Sample the streaming answer's length in the page every 10 ms (no round trips to miss steps).
    page.evaluate("window.__lengths = []; setInterval(() => { const b = document.querySelector("
                  "'.msg.streaming .body'); if (b) window.__lengths.push(b.textContent.length); }, 10)")
    before = _answer_ids(page)
    _send(page, "Name three colours of the rainbow.")
    page.wait_for_selector(".msg.streaming")
    _wait_answer(page, before)
    grown = sorted({n for n in page.evaluate("window.__lengths") if n > 0})
    assert len(grown) >= 3, f"the answer did not grow in steps while streaming: {grown}"
    stats = page.locator(".msg.assistant .stats").first.text_content()
    assert "tok/s" in stats and "tokens" in stats and "/ 2048" in stats, stats
    answer = page.locator(".msg.assistant .body").first.text_content()
    assert answer.strip()
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#conv-list li .conv-name").first.text_content() == "Name three colours of the rainbow."
    assert page.locator(".msg.assistant .body").first.text_content() == answer  # restored from the URL hash
    conv = _api(server, "GET", "/conversations")[0]
    assert conv["params"] == {"temperature": 0.0, "max_tokens": 40}


def test_stop_ends_the_answer_mid_stream(page, server):
    conv = _api(server, "POST", "/conversations", {"title": "long", "params": {"max_tokens": 1500, "seed": 1}})
    _open(page, conv["id"])
    before = _answer_ids(page)
    _send(page, "Write a very long story about a horse who learns to sing.")
    page.wait_for_function("(document.querySelector('.msg.streaming .body')?.textContent.length ?? 0) > 40")
    page.click("#stop")
    _wait_answer(page, before)
    assert "stopped" in page.locator(".msg.assistant .stats").text_content()
    saved = _api(server, "GET", f"/conversations/{conv['id']}")
    [answer] = [m for m in saved["messages"] if m["role"] == "assistant"]
    assert answer["stats"]["finish_reason"] == "cancelled" and answer["stats"]["tokens"] < 1500
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
    deadline = time.monotonic() + 10  # the server cancels the request: no slot stays busy
    while time.monotonic() < deadline:
        metrics = urllib.request.urlopen(server + "/metrics", timeout=5).read().decode()
        running = [line for line in metrics.splitlines() if line.startswith("corral_requests_running{")]
        if running and all(line.endswith(" 0") for line in running):
            break
        time.sleep(0.2)
    assert running and all(line.endswith(" 0") for line in running), running


def test_model_picker_switches_the_model(page, server):
    conv = _api(server, "POST", "/conversations", {"title": "switch", "params": FAST})
    _open(page, conv["id"])
    options = page.locator("#model option").all_text_contents()
    assert "smollm2:135m" in options and COPY in options
    page.select_option("#model", COPY)
    page.wait_for_function(f"fetch('/corral/api/conversations/{conv['id']}').then(r => r.json())"
                           f".then(c => c.model === '{COPY}')")
    before = _answer_ids(page)
    _send(page, "Say hello.")
    _wait_answer(page, before)
    assert page.locator(".msg.assistant .stats").get_attribute("title") == COPY
    loaded = {m["name"]: m["loaded"] for m in _api(server, "GET", "/models")}
    assert loaded[COPY] is True


def test_edit_makes_a_branch_and_the_switcher_moves_between_them(page, server):
    conv = _api(server, "POST", "/conversations", {"title": "branches", "params": FAST})
    _open(page, conv["id"])
    before = _answer_ids(page)
    _send(page, "What is 2 plus 2?")
    _wait_answer(page, before)
    page.locator(".msg.user .edit").click()
    page.fill(".edit-box textarea", "What is 3 plus 3?")
    before = _answer_ids(page)
    page.click(".edit-box button[type=submit]")
    _wait_answer(page, before)
    assert page.locator(".msg.user .body").text_content() == "What is 3 plus 3?"
    assert page.locator(".msg.user .branch .count").text_content() == "2/2"
    page.locator(".msg.user .branch .prev").click()
    page.wait_for_function("document.querySelector('.msg.user .branch .count')?.textContent === '1/2'")
    assert page.locator(".msg.user .body").text_content() == "What is 2 plus 2?"
    assert page.locator(".msg.assistant").count() == 1  # the old branch keeps its own answer
    page.locator(".msg.user .branch .next").click()
    page.wait_for_function("document.querySelector('.msg.user .branch .count')?.textContent === '2/2'")
    assert page.locator(".msg.user .body").text_content() == "What is 3 plus 3?"
    tree = _api(server, "GET", f"/conversations/{conv['id']}")
    assert sorted(m["content"] for m in tree["messages"] if m["role"] == "user") == ["What is 2 plus 2?",
                                                                                    "What is 3 plus 3?"]


def test_regenerate_adds_a_second_answer(page, server):
    conv = _api(server, "POST", "/conversations", {"title": "regen", "params": {**FAST, "temperature": 1.0}})
    _open(page, conv["id"])
    before = _answer_ids(page)
    _send(page, "Tell me a fact.")
    _wait_answer(page, before)
    page.locator(".msg.assistant .regen").click()
    page.wait_for_function("document.querySelector('.msg.assistant .branch .count')?.textContent === '2/2'",
                           timeout=120_000)
    tree = _api(server, "GET", f"/conversations/{conv['id']}")
    assert sum(m["role"] == "assistant" for m in tree["messages"]) == 2


XSS = ('<img src=x onerror="window.__xss=1"> <script>window.__xss=2</script> '
       '[click](javascript:window.__xss=3) <b onmouseover="window.__xss=4">bold?</b>')


def test_model_output_is_rendered_as_text_never_html(page, server):
    conv = _api(server, "POST", "/conversations", {"title": "xss"})
    _api(server, "POST", f"/conversations/{conv['id']}/messages", {"role": "user", "content": XSS})
    _api(server, "POST", f"/conversations/{conv['id']}/messages",
         {"role": "assistant", "content": "Here:\n\n" + XSS + "\n\n```html\n" + XSS + "\n```"})
    _open(page, conv["id"])
    page.wait_for_selector(".msg.assistant .code-block")
    time.sleep(0.3)
    box = page.locator("#messages")
    assert box.locator("img, script, b, a[href^='javascript']").count() == 0
    assert page.evaluate("window.__xss") is None
    assert '<img src=x onerror="window.__xss=1">' in page.locator(".msg.assistant .body p").nth(1).text_content()
    assert page.locator(".msg.user .body").text_content() == XSS
    assert page.locator(".msg.assistant pre code").text_content() == XSS


def test_server_errors_show_in_the_chat(page, server):
    conv = _api(server, "POST", "/conversations", {"title": "errors", "model": "ghost:latest", "params": FAST})
    _open(page, conv["id"])
    _send(page, "Hello?")
    error = page.locator(".msg.error")
    error.wait_for()
    assert "404" in error.text_content() and "ghost" in error.text_content()
    _api(server, "PATCH", f"/conversations/{conv['id']}", {"model": "smollm2:135m", "params": {"max_tokens": 100000}})
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator(".msg.error").count() == 0
    page.click(".retry button")
    page.wait_for_selector(".msg.error")
    assert "400" in page.locator(".msg.error").text_content()


def test_sidebar_search_rename_and_delete(page, server):
    a = _api(server, "POST", "/conversations", {"title": "Zebra facts"})
    b = _api(server, "POST", "/conversations", {"title": "Quokka notes"})
    _open(page)
    page.fill("#search", "zebra")
    page.wait_for_function("[...document.querySelectorAll('#conv-list .conv-name')].map(e => e.textContent)"
                           ".join('|') === 'Zebra facts'")
    page.fill("#search", "")
    item = page.locator(f"#conv-list li[data-id='{b['id']}']")
    item.locator(".rename").click()
    page.fill(".rename-input", "Quokka notes, renamed")
    page.press(".rename-input", "Enter")
    page.wait_for_selector(f"#conv-list li[data-id='{b['id']}'] >> text=Quokka notes, renamed")
    item = page.locator(f"#conv-list li[data-id='{a['id']}']")
    item.locator(".delete").click()
    item.locator(".delete").click()  # the second click confirms
    page.wait_for_selector(f"#conv-list li[data-id='{a['id']}']", state="detached")
    titles = [c["title"] for c in _api(server, "GET", "/conversations")]
    assert "Zebra facts" not in titles and "Quokka notes, renamed" in titles


def test_theme_toggle_switches_colours(page):
    _open(page)
    before = page.evaluate("getComputedStyle(document.body).backgroundColor")
    page.click("#theme-toggle")
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") != before
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"  # remembered


def test_screenshots_desktop_and_phone(browser, server):
    conv = _api(server, "POST", "/conversations", {"title": "Python: add two numbers",
                                                   "params": {"temperature": 0, "seed": 1, "max_tokens": 120}})
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=server, color_scheme="light",
                                  bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    _open(page, conv["id"])
    before = _answer_ids(page)
    _send(page, "Write a Python function that adds two numbers.")
    _wait_answer(page, before)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "webui-desktop.png"))
    context.close()

    phone = browser.new_context(viewport={"width": 390, "height": 844}, base_url=server, is_mobile=True,
                                has_touch=True, color_scheme="dark", bypass_csp=True)
    page = phone.new_page()
    _open(page, conv["id"])
    sidebar = page.locator("#sidebar")
    assert sidebar.bounding_box()["x"] + sidebar.bounding_box()["width"] <= 0  # the drawer is closed
    assert page.locator("#open-sidebar").is_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
    page.screenshot(path=str(SHOTS / "webui-phone.png"))
    page.click("#open-sidebar")
    page.wait_for_function("document.querySelector('#sidebar').getBoundingClientRect().x >= 0")
    page.locator("#conv-list .conv-name").first.click()
    page.wait_for_function("document.querySelector('#sidebar').getBoundingClientRect().right <= 0")
    phone.close()


MARKDOWN = """# Title
Some *em*, **strong**, ~~gone~~, `x < y`, snake_case_name and a [link](https://example.com).

- one
  - nested
- two

1. first
2. second

> quoted

| a | b |
|---|---|
| 1 | 2 |

```python
def f():  # note
    return "s"
```
"""


def test_markdown_renders_blocks_inline_and_code(page):
    _open(page)
    html = page.evaluate("(md) => { const d = document.createElement('div'); CorralMarkdown.render(md, d);"
                         " return d.innerHTML; }", MARKDOWN)
    for fragment in ["<h1>Title</h1>", "<em>em</em>", "<strong>strong</strong>", "<del>gone</del>",
                     '<code class="inline">x &lt; y</code>', "snake_case_name",
                     '<a href="https://example.com" target="_blank" rel="noopener noreferrer">link</a>',
                     "<li>nested</li>", "<ol><li>first</li><li>second</li></ol>", "<blockquote><p>quoted</p>",
                     "<th>a</th>", "<td>2</td>", '<span class="code-lang">python</span>',
                     '<span class="tok-keyword">def</span>', '<span class="tok-comment"># note</span>',
                     '<span class="tok-string">"s"</span>', '<button class="copy-code" type="button">Copy</button>']:
        assert fragment in html, fragment


def test_page_runs_under_its_content_security_policy(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=server)  # CSP enforced
    page = context.new_page()
    messages: list[str] = []
    page.on("console", lambda m: messages.append(m.text))
    page.on("pageerror", lambda e: messages.append(str(e)))
    try:
        page.goto("/")
        page.wait_for_selector("body[data-ready='1']")
        page.click("#theme-toggle")
        page.wait_for_selector("html[data-theme='dark']")
        assert page.locator("#model option").count() >= 2
    finally:
        context.close()
    assert not [m for m in messages if "Content Security Policy" in m or "Error" in m], messages
