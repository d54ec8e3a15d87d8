"""Generation tasks through --server: Corral's own live server gives what the local engine gives."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import corral
from corral.eval import humaneval
from corral.eval.generation import GenRequest, generate_local
from corral.eval.server_backend import ServerModel

MODEL = "smollm2:135m"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(tmp_path_factory, one_thread):
    from corral.store import Store
    from corral.store.load import ensure_default

    spec = importlib.util.spec_from_file_location("server_live", Path(__file__).parents[1] / "server" / "conftest.py")
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    home = tmp_path_factory.mktemp("evalgen-home")
    ensure_default(Store(home))
    server = module.start_server(home)
    yield server
    server.stop()


def test_server_generation_equals_local_greedy_generation(live):
    requests = [GenRequest("Question: Tom has 3 apples and buys 4 more. How many now?\nAnswer:",
                           until=("Question:", "\n\n"), max_gen_toks=24),
                GenRequest("def add(a, b):\n    \"\"\"Sum.\"\"\"\n", until=humaneval.STOP, max_gen_toks=24)]
    seen = []
    remote = ServerModel(live.url, MODEL).generate(requests, seen.append)
    local = generate_local(corral.load(), requests)  # not the served engine: that one is the server's to step
    assert remote == local and sum(seen) == 2
    assert all(len(texts) == 1 and "Question:" not in texts[0] for texts in remote)


def test_server_chat_generation_is_the_chat_answer(live):
    req = GenRequest("Name the capital of France.", max_gen_toks=16, chat=True)
    ((text,),) = ServerModel(live.url, MODEL).generate([req])
    assert text == corral.load().chat([{"role": "user", "content": req.prompt}], temperature=0,
                                      max_new_tokens=16).text
