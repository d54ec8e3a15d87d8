"""Corral's block kernels (corral/kernels) against torch's weight-only kernels: `python bench/kernels.py`.

Two tables, at each thread count (default 1 and 2):
1. per call, microseconds (best / median of --repeats): our Q4_1 / Q8_0 module vs ``Int4Linear``
   (``_weight_int4pack_mm_for_cpu``, bf16 activations), ``Int8Linear`` (``_weight_int8pack_mm``) and a
   plain fp32 ``F.linear``, for SmolLM2-135M's shapes at M = 1, 8, 512 rows of activations;
2. batch-1 greedy decode of the embedded SmolLM2-135M (Q4_1 + Q8_0 GGUF), tok/s over --new-tokens:
   ``corral.load(quant="gguf")`` as is, the same model with every linear swapped for ours (built from
   the same GGUF blocks), and that with wq/wk/wv and w1/w3 fused into one call each (a benchmark-only
   shim here; the model code is not changed by this script).

The machine may be shared: each figure is the best and the median of several runs.
Options: --threads 1,2  --repeats N  --new-tokens N  --skip-micro  --skip-e2e.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from corral import kernels
from corral.kernels.linear import BlockLinear, Q4Linear, Q8Linear, fuse_rows, gguf_linear
from corral.model.quant import Int4Linear, Int8Linear

SHAPES = [(576, 576, "wq/wo"), (192, 576, "wk/wv"), (1536, 576, "w1/w3"), (576, 1536, "w2"),
          (49152, 576, "output")]


def timed(fn, repeats: int) -> tuple[float, float]:
    """(best, median) seconds of fn() over `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def micro(threads: int, repeats: int) -> list[tuple]:
    torch.manual_seed(0)
    rows = []
    for n, k, name in SHAPES:
        w = torch.randn(n, k) * 0.05
        out = n == 49152
        ours = Q8Linear.from_float(w, "q8_0") if out else Q4Linear.from_float(w, "q4_1")
        theirs = Int8Linear.from_float(w) if out else Int4Linear.from_float(w)
        for m in (1, 8) if out else (1, 8, 512):
            x = torch.randn(m, k)
            reps = max(3, repeats // (20 if m == 512 or out else 1))
            dense = nn.Linear(k, n, bias=False)
            dense.weight.data = w
            fig = [timed(lambda f=f, x=x: f(x), reps) for f in (ours, theirs, dense)]
            rows.append((threads, f"{n}x{k} {name}", m, *fig))
    return rows


def print_micro(rows: list[tuple]) -> None:
    print("| threads | weight (out x in) | M | ours µs best / median | torch int4/int8 µs | fp32 µs | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for threads, shape, m, ours, theirs, dense in rows:
        kind = "int8" if shape.endswith("output") else "int4"
        print(f"| {threads} | {shape} | {m} | {ours[0] * 1e6:.1f} / {ours[1] * 1e6:.1f} | "
              f"{theirs[0] * 1e6:.1f} / {theirs[1] * 1e6:.1f} ({kind}) | {dense[0] * 1e6:.1f} / {dense[1] * 1e6:.1f} | "
              f"{theirs[0] / ours[0]:.2f}x |")


# -- end to end ---------------------------------------------------------------------------------------------------

def swap_linears_(model: nn.Module, raw: dict) -> nn.Module:
    """Every GGUF-native linear (and a tied model's output) becomes ours, built from the same blocks."""
    for name, (ggml_type, data, shape) in raw.items():
        if name == "tok_embeddings.weight" and not model.config.tie_embeddings:
            continue  # untied: the embedding stays a lookup table
        module_name = "output" if name == "tok_embeddings.weight" else name.removesuffix(".weight")
        parent_name, _, attr = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, gguf_linear(ggml_type, data, tuple(shape)))
    return model


class _Slice(nn.Module):
    """One output slice of a fused projection: the fused call runs once per distinct input tensor."""

    def __init__(self, shared: dict, start: int, stop: int):
        super().__init__()
        self.shared, self.start, self.stop = shared, start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared.get("x") is not x:
            self.shared["x"], self.shared["y"] = x, self.shared["fused"](x)
        return self.shared["y"][..., self.start:self.stop]


def fuse_projections_(model: nn.Module) -> nn.Module:
    """Benchmark shim: wq/wk/wv and w1/w3 each become slices of one fused module (see fuse_rows)."""
    for layer in model.layers:
        for parent, names in ((layer.attention, ("wq", "wk", "wv")), (layer.feed_forward, ("w1", "w3"))):
            parts = [getattr(parent, n) for n in names]
            shared = {"fused": fuse_rows(parts)}
            start = 0
            for n, part in zip(names, parts):
                setattr(parent, n, _Slice(shared, start, start + part.out_features))
                start += part.out_features
    return model


def decode_tok_s(llm, new_tokens: int) -> float:
    from corral.engine.sampling import SamplingParams

    prompt = llm.tokenizer.encode("The history of the city begins with a small market by the river, where")
    clear = getattr(llm.engine, "clear_prefix_cache", None)
    if clear:
        clear()
    done = llm.engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True))
    return (len(done[0].token_ids) - 1) / done[0].timings["decode_s"]


def linear_share(llm, new_tokens: int) -> tuple[float, float]:
    """(ms per token inside our linear modules, ms per token in all) for one greedy decode."""
    spent = [0.0]
    forward = BlockLinear.forward

    def timed_forward(self, x):
        start = time.perf_counter()
        y = forward(self, x)
        spent[0] += time.perf_counter() - start
        return y

    BlockLinear.forward = timed_forward
    try:
        rate = decode_tok_s(llm, new_tokens)
    finally:
        BlockLinear.forward = forward
    # The prefill's linear calls are in `spent` too; at 12 prompt tokens they are about one decode step.
    return spent[0] * 1e3 / new_tokens, 1e3 / rate


def e2e(threads: int, new_tokens: int, runs: int) -> list[tuple]:
    """The three variants load side by side and take turns, so load from other processes hits all alike."""
    import corral
    from corral.checkpoint.gguf import load_gguf_quantized
    from corral.llm import default_model_path

    _, raw = load_gguf_quantized(default_model_path())
    base, ours, fused = corral.load(quant="gguf"), corral.load(quant="gguf"), corral.load(quant="gguf")
    swap_linears_(ours.model, raw)
    fuse_projections_(swap_linears_(fused.model, raw))
    del raw
    variants = {"corral.load(quant='gguf') (torch kernels)": base, "every linear -> corral.kernels": ours,
                "  + fused wq|wk|wv and w1|w3": fused}
    probe = base.tokenizer.encode("The capital of France is Paris. The capital of Germany is")
    tokens = {name: llm.engine.generate([probe], _greedy(16))[0].token_ids for name, llm in variants.items()}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, llm in variants.items():
            rates[name].append(decode_tok_s(llm, new_tokens))
    ref = tokens["corral.load(quant='gguf') (torch kernels)"]
    for name, toks in tokens.items():
        print(f"(greedy, first 16 tokens: {name.strip()} agrees with torch kernels on "
              f"{sum(a == b for a, b in zip(ref, toks))}/16)")
    linear_ms, total_ms = linear_share(ours, new_tokens)
    print(f"(threads {threads}: our linears take {linear_ms:.1f} ms of {total_ms:.1f} ms per token)")
    return [(threads, name, r) for name, r in rates.items()]


def _greedy(n: int):
    from corral.engine.sampling import SamplingParams

    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)


def print_e2e(rows: list[tuple]) -> None:
    print("| threads | variant | decode tok/s best | median |")
    print("|---|---|---|---|")
    for threads, name, rates in rows:
        print(f"| {threads} | {name} | {max(rates):.1f} | {statistics.median(rates):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-micro", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit(f"corral kernels unavailable: {kernels.unavailable_reason()}")
    print(f"kernels: simd={kernels.has_simd()} flags={' '.join(kernels._get()['flags'])}")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        if not args.skip_micro:
            print_micro(micro(threads, args.repeats))
        if not args.skip_e2e:
            print_e2e(e2e(threads, args.new_tokens, args.runs))


if __name__ == "__main__":
    main()
