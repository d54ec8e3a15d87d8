"""The --server backend against Corral's own live server (echo + logprobs), and against one that never answers."""

import importlib.util
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from corral.errors import EvalServerError
from corral.eval.server_backend import ServerModel

MODEL = "smollm2:135m"


def _start_server():
    """tests/server's live-server starter (loaded by path: two conftest modules cannot both be `conftest`)."""
    spec = importlib.util.spec_from_file_location("server_live", Path(__file__).parents[1] / "server" / "conftest.py")
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module.start_server


@pytest.fixture(scope="module")
def live(tmp_path_factory, one_thread):
    from corral.store import Store
    from corral.store.load import ensure_default

    home = tmp_path_factory.mktemp("eval-home")
    ensure_default(Store(home))
    server = _start_server()(home)
    yield server
    server.stop()


def test_completions_echo_with_logprobs_scores_every_prompt_token(live):
    body = {"model": MODEL, "prompt": "The capital of France is Paris", "max_tokens": 1, "temperature": 0,
            "echo": True, "logprobs": 1}
    answer = httpx.post(live.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]
    lp = answer["logprobs"]
    llm = live.model().llm
    ids = llm.tokenizer.encode("The capital of France is Paris", bos=llm.add_bos)
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    assert "".join(lp["tokens"][:-1]) == "The capital of France is Paris" and lp["text_offset"][:2] == [0, 3]
    with torch.no_grad():
        want = llm.model(torch.tensor([ids]))[0].log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])
    assert lp["token_logprobs"][1:-1] == pytest.approx(want.squeeze(1).tolist(), abs=1e-4)
    assert all(len(top) == 1 for top in lp["top_logprobs"][1:])


def test_server_backend_scores_continuations_like_the_served_model(live):
    llm = live.model().llm
    pairs = [("The capital of France is", " Paris"), ("1, 2, 3,", " 4, 5, 6"), ("Answer: ", "B")]
    got = ServerModel(live.url, MODEL).loglikelihood(pairs)
    for (context, continuation), (lp, _) in zip(pairs, got):
        context, continuation = context.rstrip(), continuation if not context.endswith(" ") else " " + continuation
        ctx = llm.tokenizer.encode(context, bos=llm.add_bos)
        whole = llm.tokenizer.encode(context + continuation, bos=llm.add_bos)
        with torch.no_grad():
            logp = llm.model(torch.tensor([whole]))[0].log_softmax(-1)
        want = sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))
        assert lp == pytest.approx(want, abs=1e-3)
    assert got[1][1] is True


def test_unknown_model_on_the_server_is_a_clear_error_without_retries(live):
    backend = ServerModel(live.url, "no-such-model", retries=3, backoff=5.0)
    started = time.time()
    with pytest.raises(EvalServerError, match="404"):
        backend.loglikelihood([("a", " b")])
    assert time.time() - started < 5.0


@pytest.fixture
def silent_server():
    """Accepts connections and never answers; counts them."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    accepted, stop = [], threading.Event()

    def serve():
        sock.settimeout(0.05)
        while not stop.is_set():
            try:
                accepted.append(sock.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", accepted
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    sock.close()


def test_server_that_times_out_is_retried_then_a_clear_error(silent_server):
    url, accepted = silent_server
    backend = ServerModel(url, "m", timeout=0.3, retries=2, backoff=0.01)
    with pytest.raises(EvalServerError, match="did not answer after 3 tries"):
        backend.loglikelihood([("a", " b")])
    assert len(accepted) == 3


def test_cli_server_timeout_is_one_line_not_a_traceback(silent_server, capsys):
    from corral.cli import main

    url, _ = silent_server
    code = main(["eval", "--server", url, "--model", "m", "--tasks", "arc_easy", "--limit", "1", "--timeout", "0.2",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "did not answer" in err and "Traceback" not in err


def test_cli_eval_through_the_server_prints_the_table(live, capsys):
    from corral.cli import main

    assert main(["eval", "--server", live.url, "--model", MODEL, "--tasks", "arc_easy", "--limit", "2",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"model: {MODEL}" in out and "| arc_easy | acc_norm |" in out
