"""bench/qlora_memory.py at a small size: a QLoRA step on a 2-layer Llama-3.2-1B-shaped model in Q4_0 blocks
runs in a child process whose peak RSS is a fraction of full fp32 fine-tuning's weights + grads + Adam."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench" / "qlora_memory.py"


@pytest.mark.slow  # a child process builds and quantizes 190 M random weights (about 30 s of CPU)
def test_qlora_step_peak_rss_is_a_fraction_of_full_fp32_finetuning():
    spec = importlib.util.spec_from_file_location("qlora_memory", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.run(n_layers=2, vocab=32000, seq=16)
    assert r["grad_reached_block_0"] and r["lora_a_shape"] == [8, 2048]
    assert r["fp32_full_ft_bytes"] == r["params"] * 16
    # 187 M parameters: 2.8 GiB for fp32 fine-tuning; the blocks (Q4_0, 4.5 bits) are ~105 MB, torch ~300 MB.
    assert r["peak_rss_bytes"] < 1.0 * 2**30 and r["ratio"] > 3, r
