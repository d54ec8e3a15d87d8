"""Corral's K-quant path against llama.cpp on the Llama-3.2-1B-shaped Q4_K_M file (issue 19).

The file is made by bench/kquant_files.py (transformers + llama.cpp's converter and quantizer, ~15 minutes
on 2 cores), so this test runs where it exists: $CORRAL_KQUANT_1B_DIR (default /tmp/corral-1b). The
golden (scripts/record_llamacpp_kquant.py) holds llama.cpp's teacher-forced top-1 tokens.

Why 0.78 and not the issue's 0.95: random weights leave small logit margins (median top-1/top-2 gap 0.15
against a logit spread of 0.9), and llama.cpp's own activation rounding moves logits by 0.06 rms. Measured
on the first 96 positions: the exact computation (the file's weights widened to fp32, no activation
rounding) agrees with llama.cpp on 82.3%, Corral's kernels on 82.3% too, with the same rms distance
(0.060 vs 0.062). So the bar is "as close to llama.cpp as exact arithmetic is", less a margin for noise.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]
GOLDEN = ROOT / "tests/golden/llama1b_q4km_llamacpp_top1.json"
FILE = Path(os.environ.get("CORRAL_KQUANT_1B_DIR", "/tmp/corral-1b")) / "model-Q4_K_M.gguf"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not FILE.is_file(), reason=f"no {FILE} (bench/kquant_files.py)")]


def test_teacher_forced_top1_agrees_with_llamacpp_on_q4_k_m():
    sys.path.insert(0, str(ROOT / "scripts"))
    from record_llamacpp_kquant import file_digest

    from corral import kernels
    from corral.kernels.kquant import KQuantEmbedding, KQuantLinear
    from corral.llm import load

    golden = json.loads(GOLDEN.read_text())
    assert file_digest(FILE) == golden["file"]["digest"], "a different file: rerun scripts/record_llamacpp_kquant.py"
    llm = load(FILE)
    model = llm.model
    if kernels.available():  # every weight runs in place: no layer was widened
        assert isinstance(model.tok_embeddings, KQuantEmbedding) and isinstance(model.output, KQuantLinear)
        assert all(isinstance(m, KQuantLinear) for layer in model.layers
                   for m in (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13, layer.feed_forward.w2))
    with torch.no_grad():
        logits = model(torch.tensor([golden["input_ids"]]))[0]
    agree = (logits.argmax(-1) == torch.tensor(golden["top1"])).float().mean().item()
    assert agree >= 0.78, agree
