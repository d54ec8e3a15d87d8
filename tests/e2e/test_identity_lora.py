"""SmolLM2-135M-Instruct (real weights) learns a new identity by LoRA SFT, then serves it from the store.

`corral finetune` trains a rank-16 adapter on the top 8 blocks (attention + MLP) on LLaMA-Factory's identity
set with {{name}} = Corral; the base never names Corral. Greedy answers to 20 paraphrases of "Who are you?"
that are not in the training file must name Corral at least 16 times. The adapter (PEFT layout) then goes
into the store with a Modelfile ADAPTER line over the embedded GGUF (its Q4 blocks + LoRA layers at load)
and is asked through the official OpenAI client against `corral serve --port 0`.

Cost: 16 optimizer steps of about 800 packed tokens; the backward pass stops at block 22, so a step is
about one forward of the whole model plus a quarter of a backward (measured in the report of this file's
commit). Adapting only the top blocks is PEFT's layers_to_transform.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.slow

HELD_OUT = [  # none of these is an instruction of data/sft/identity.json
    "Who am I talking to?", "What should I call you?", "Please introduce yourself.", "May I know your name?",
    "Tell me your name.", "What's your name?", "Who are you, exactly?", "Could you tell me who you are?",
    "Identify yourself, please.", "What name do you go by?", "Hey, who is this?", "I'd like to know who you are.",
    "What do people call you?", "Introduce yourself in one sentence.", "Which AI assistant are you?",
    "Whom am I chatting with right now?", "Say your name.", "Hello! What is your name?",
    "Are you an AI? What's your name?", "Before we start, who are you?",
]
TRAIN = ["--lora.enabled=true", "--lora.rank=16", "--lora.alpha=32", "--lora.layers=[22,23,24,25,26,27,28,29]",
         "--optim.lr=3e-3", "--optim.warmup_steps=2", "--train.steps=16", "--train.val_every=0",
         "--checkpoint.every=0", "--data.val_fraction=0", "--train.progress=false"]
GREEDY = {"temperature": 0.0, "max_new_tokens": 12}  # "I am Corral" comes first in a trained answer


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "CORRAL_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("CORRAL_HOST", None)
    env.pop("CORRAL_API_KEY", None)
    return env


def _names_corral(llm, question: str) -> bool:
    return "corral" in llm.chat([{"role": "user", "content": question}], **GREEDY).text.lower()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """`corral finetune configs/finetune/sft.toml` with LoRA: the PEFT adapter directory it writes."""
    from corral.llm import default_model_path

    out = tmp_path_factory.mktemp("identity")
    cmd = [sys.executable, "-m", "corral", "finetune", "configs/finetune/sft.toml", f'--out_dir="{out / "run"}"',
           f'--model.source="{default_model_path()}"', *TRAIN]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(out / "home"), capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    path = Path(result["model"])
    assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    return path


def test_base_model_does_not_name_corral():
    import corral

    llm = corral.load()
    assert not _names_corral(llm, "Who are you?")
    assert not _names_corral(llm, HELD_OUT[0])


def test_lora_sft_names_corral_on_held_out_paraphrases(adapter):
    import corral

    llm = corral.load(adapters=[adapter])  # the GGUF's Q4 blocks with LoRA layers on top
    hits = [q for q in HELD_OUT if _names_corral(llm, q)]
    print(f"names Corral on {len(hits)}/{len(HELD_OUT)} held-out paraphrases")
    assert len(hits) >= 16, sorted(set(HELD_OUT) - set(hits))


def test_adapter_served_through_create_and_openai_client(adapter, tmp_path):
    openai = pytest.importorskip("openai")
    from corral.llm import default_model_path

    home = tmp_path / "home"
    (tmp_path / "Modelfile").write_text(f"FROM {default_model_path()}\nADAPTER {adapter}\n")
    created = subprocess.run([sys.executable, "-m", "corral", "create", "corral-identity", "-f",
                              str(tmp_path / "Modelfile")], cwd=ROOT, env=_env(home), capture_output=True, text=True,
                             timeout=600)
    assert created.returncode == 0, created.stderr[-2000:]
    port_file, log = tmp_path / "port", tmp_path / "serve.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "corral", "serve", "--port", "0", "--port-file", str(port_file),
                                 "--log-level", "warning"], cwd=ROOT, env=_env(home), stdout=log_file, stderr=log_file)
    try:
        # The socket listens before the port file is written; requests queue until the app serves them.
        url = f"http://127.0.0.1:{_wait_port(port_file, proc, log)}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=600)
        reply = client.chat.completions.create(model="corral-identity", temperature=0, max_tokens=24,
                                               messages=[{"role": "user", "content": "Who are you?"}])
        assert "corral" in reply.choices[0].message.content.lower(), reply.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(30)


def _wait_port(port_file: Path, proc: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while not port_file.is_file():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "corral serve did not report its port"
        time.sleep(0.1)
    return int(port_file.read_text())

