"""Issue 14 item 2 (RELIABILITY 39): a user template that loops or grows without end is stopped by the
render's time and size budget, and refused by create's trial render."""

import time
import tracemalloc

import pytest

from corral.errors import ChatFormatError
from corral.tokenizer import template as tpl

DIALOG = [{"role": "user", "content": "hi"}]
NESTED_LOOPS = "{% for i in range(50000) %}{% for j in range(50000) %}{% endfor %}{% endfor %}x"
GROWERS = {
    "concat": "{% set ns = namespace(s='ab') %}{% for i in range(31) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "plus": "{% set ns = namespace(s='ab') %}{% for i in range(31) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "join": "{% set ns = namespace(s='ab') %}{% for i in range(31) %}{% set ns.s = [ns.s, ns.s]|join %}{% endfor %}",
    "format": "{% set ns = namespace(s='a') %}{% for i in range(31) %}{% set ns.s = '%s%s' % (ns.s, ns.s) %}"
              "{% endfor %}",
    "list": "{% set ns = namespace(l=[1]) %}{% for i in range(31) %}{% set ns.l = ns.l + ns.l %}{% endfor %}",
    "method": "{{ 'a'.ljust(10**9) }}", "filter": "{{ 'a'|center(10**9) }}",
}


def render(source: str) -> str:
    return tpl.render_template(tpl.compile_template(source), messages=DIALOG, add_generation_prompt=True)


@pytest.mark.parametrize("name", GROWERS)
def test_doubling_and_padding_stop_at_the_size_budget_with_little_memory(name):
    """Issue 14 item 2: `ns.s ~ ns.s` 31 times took 2.4 GB in 3.5 s; every way to build a huge value stops
    at the 4 M budget, in well under a second and under 64 MB."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ChatFormatError, match="budget"):
            render(GROWERS[name])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 2 and peak < 64 << 20


def test_nested_loops_stop_at_the_time_budget(monkeypatch):
    """Issue 14 item 2: nested range(50000) loops (75 s of frozen server) stop at RENDER_SECONDS."""
    monkeypatch.setattr(tpl, "RENDER_SECONDS", 0.5)
    started = time.perf_counter()
    with pytest.raises(ChatFormatError, match="took over 0.5 s"):
        render(NESTED_LOOPS)
    assert time.perf_counter() - started < 3
    recursive = "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}"
    with pytest.raises(ChatFormatError, match="took over"):
        render(recursive)


def test_the_budget_leaves_the_threads_tracer_as_it_was(monkeypatch):
    """Issue 14 item 2: the time check is a trace function for this thread only, removed after the render."""
    import sys

    def keep(frame, event, arg):
        return None

    sys.settrace(keep)
    try:
        assert render("{{ messages[0].content }}") == "hi"
        assert sys.gettrace() is keep
    finally:
        sys.settrace(None)


def test_create_refuses_a_template_that_fails_its_trial_render(monkeypatch):
    """Issue 14 item 2: check_template (run by create) refuses loops and growth; it accepts a real template,
    also one that refuses a system message but renders a plain dialog."""
    monkeypatch.setattr(tpl, "RENDER_SECONDS", 0.5)
    for source in (NESTED_LOOPS, GROWERS["concat"]):
        with pytest.raises(ChatFormatError, match="budget"):
            tpl.check_template(source)
    with pytest.raises(ChatFormatError, match="trial render"):
        tpl.check_template("{{ messages[5].content.upper() }}")
    tpl.check_template("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}")
    tpl.check_template("{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                       "{% for m in messages %}{{ m.content }}{% endfor %}")
