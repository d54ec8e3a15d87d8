"""The embedded guard: a linear head on the frozen trunk of the embedded SmolLM2-135M-Instruct.

No Llama Guard weights ship with Corral, so the default guard is a probe (Alain & Bengio 2016, arXiv
1610.01644): the message to assess, as a line of Llama Guard's conversation section ("User: ..." or
"Agent: ..."), goes through the first blocks of the frozen trunk; the masked means of the hidden states
after the blocks in FeatureSpec.layers (and the last token's state after those in FeatureSpec.last), side by
side, are one feature vector, and a linear layer maps it
to 1 + 14 logits: unsafe, then Llama Guard 3's S1..S14. Only the assessed message goes in (not the
category instructions: they are the same for every input and would add ~250 tokens to each), and only up
to the deepest block used is run (9 of 30: on 2 shared cores, embedding cost is the budget).

Training (scripts/train_guard.py) and inference share `features`, so the head sees at run time exactly
the vectors it was fitted on. The head ships as guard_head/head.safetensors + guard_head/config.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from corral.errors import FormatError

HEAD_DIR = Path(__file__).parent / "guard_head"


@dataclass(frozen=True)
class FeatureSpec:
    layers: tuple[int, ...]
    """Blocks (1-based) after which the hidden states are mean-pooled; 0 means the final norm's output."""
    max_tokens: int = 64
    """Tokens per segment; a longer message is assessed in segments (guard.segments)."""
    last: tuple[int, ...] = ()
    """Blocks whose last token's hidden state (under causal attention it has seen the whole message) follows
    the means."""

    def parts(self) -> list[tuple[int, str]]:
        """(block, "mean" | "last") of each dim-wide slice of the feature vector, in order."""
        return [(i, "mean") for i in self.layers] + [(i, "last") for i in self.last]


def conversation_block(role: str, text: str) -> str:
    """The one message as a line of Llama Guard's conversation section ("User: ..." / "Agent: ...")."""
    return f"{role}: {text}"


def token_rows(llm, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Each text as ids (BOS when the model takes one), the head kept when longer than max_tokens."""
    rows = [llm.tokenizer.encode(t, bos=llm.add_bos)[:max_tokens] for t in texts]
    return [r or [0] for r in rows]


def pooled_layers(model, rows: list[list[int]], parts: list[tuple[int, str]]) -> torch.Tensor:
    """Id rows -> (B, len(parts) * dim): per (block, pooling) part, the masked mean of the hidden states after
    that block, or its last real token's state.

    Rows are right-padded: attention is causal, so pads after a row's last token never reach its real
    positions, and the mask keeps them out of the mean."""
    T = max(len(r) for r in rows)
    device = next(model.parameters()).device
    tokens = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=device)  # (B, T)
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (T - len(r)) for r in rows], device=device)[..., None]  # (B,T,1)
    h = model.tok_embeddings(tokens)  # (B, T, dim)
    cos, sin = model.rope_tables(T, 0, device)
    wanted, out = {i for i, _ in parts}, {}
    deepest = len(list(model.blocks())) if 0 in wanted else max(wanted)  # later blocks are not run at all
    for i, block in enumerate(model.blocks(), 1):
        if i > deepest:
            break
        h = block(h, cos, sin, None, None, 0)
        if i in wanted:
            out[i] = h
    if 0 in wanted:
        out[0] = model.norm(h)
    last = torch.tensor([len(r) - 1 for r in rows], device=device)  # (B,) each row's last real position
    batch = torch.arange(len(rows), device=device)
    pools = {"mean": lambda h: (h * mask).sum(1) / mask.sum(1), "last": lambda h: h[batch, last]}  # (B, dim)
    return torch.cat([pools[p](out[i].float()) for i, p in parts], dim=-1)


def features(llm, texts: list[str], spec: FeatureSpec, batch_size: int = 8) -> torch.Tensor:
    """Texts (already conversation blocks) -> (N, len(spec.parts()) * dim) float32 features."""
    rows = token_rows(llm, texts, spec.max_tokens)
    dim = llm.model.config.dim
    out = torch.empty(len(rows), len(spec.parts()) * dim)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths together: little padding
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            out[chunk] = pooled_layers(llm.model, [rows[i] for i in chunk], spec.parts()).cpu()
    return out


class Head:
    """The fitted probe: standardize, then one linear layer -> (N, 1 + categories) logits."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor,
                 spec: FeatureSpec, codes: list[str], threshold: float = 0.5):
        self.weight, self.bias, self.mean, self.scale = weight, bias, mean, scale  # (K, F), (K,), (F,), (F,)
        self.spec, self.codes, self.threshold = spec, codes, threshold

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(N, F) features -> (N, 1 + len(codes)) sigmoid probabilities: P(unsafe), then per category."""
        return torch.sigmoid(((x - self.mean) / self.scale) @ self.weight.T + self.bias)

    def save(self, folder: Path, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.contiguous(), "bias": self.bias, "mean": self.mean, "scale": self.scale},
                  str(folder / "head.safetensors"))
        config = {"layers": list(self.spec.layers), "max_tokens": self.spec.max_tokens,
                  "last": list(self.spec.last), "codes": self.codes,
                  "threshold": self.threshold, **(extra or {})}
        (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")

    @classmethod
    def load(cls, folder: Path = HEAD_DIR) -> Head:
        from safetensors.torch import load_file

        try:
            config = json.loads((folder / "config.json").read_text())
            t = load_file(str(folder / "head.safetensors"))
            spec = FeatureSpec(tuple(config["layers"]), int(config["max_tokens"]),
                               tuple(config.get("last", ())))
            return cls(t["weight"], t["bias"], t["mean"], t["scale"], spec, list(config["codes"]),
                       float(config.get("threshold", 0.5)))
        except (OSError, KeyError, ValueError) as e:
            raise FormatError(f"guard head in {folder} is unreadable: {e}", path=str(folder)) from e
