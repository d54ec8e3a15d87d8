"""The Llama 3 transformer (Llama Team, "The Llama 3 Herd of Models", arXiv 2407.21783).

Pre-norm decoder blocks: h = x + Attention(RMSNorm(x)); out = h + SwiGLU(RMSNorm(h)).
Attention is grouped-query (each key/value head serves n_heads / n_kv_heads query heads)
with rotary positions. Parameter names are the keys of Meta's consolidated checkpoints.

No I/O, no process groups, no device strings: loaders build this on the meta device and
assign weights; parallelism, quantization and LoRA are transforms applied afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from corral.model.config import ModelConfig
from corral.model.rope import rope_angles, rope_frequencies, rotate


class KVCache(Protocol):
    """Where attention keeps past keys and values; owned by the caller (the engine), not the model."""

    def update(
        self, layer_id: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_heads, T, head_dim) at start_pos; return all so far (B, n_kv_heads, S, head_dim)."""
        ...


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is torch.float32 and self.weight.dtype is torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel, same arithmetic
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, layer_id: int, config: ModelConfig):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of x (B, T, dim); corral.model.fuse swaps in a single matmul."""
        return self.wq(x), self.wk(x), self.wv(x)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        start_pos: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, n_heads, head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if cache is not None:
            k, v = cache.update(self.layer_id, start_pos, k, v)  # (B, n_kv_heads, S, head_dim)
            k, v = k.to(q.dtype), v.to(q.dtype)  # a cache may keep a narrower dtype (no-op otherwise)
        # GQA: each key/value head serves n_heads / n_kv_heads consecutive query heads.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=self.n_heads != self.n_kv_heads
        )
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020, arXiv 2002.05202): w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w1 x and w3 x; corral.model.fuse swaps in a single matmul."""
        return self.w1(x), self.w3(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, layer_id: int, config: ModelConfig):
        super().__init__()
        self.attention = Attention(layer_id, config)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, cos, sin, mask, cache, start_pos):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Embedding -> blocks -> final norm (``hidden``) -> output projection (``forward``).

    A pipeline stage is a pruned Transformer (corral.train.pipeline): ``tok_embeddings`` is None after the
    first stage, ``norm`` and ``output`` before the last, and ``layers`` a ModuleDict keyed by each block's
    index in the whole model, so parameter names stay ``layers.{i}.*``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Weights come from init_weights_ or a loader, so the table is left uninitialised: on the meta
        # device a normal_ init would import torch's decompositions first (about 2 s of load time).
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim,
                                           _weight=torch.empty(config.vocab_size, config.dim))
        self.layers = nn.ModuleList(Block(i, config) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # Tied models (Llama 3.2 1B/3B) project with the embedding matrix and have no `output` weight.
        self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int | torch.Tensor = 0,
        cache: KVCache | None = None,
        last_only: bool = False,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> float32 logits (B, T, vocab), or (B, 1, vocab) if last_only.

        start_pos is where the tokens start: one int for the whole batch, or a (B,) tensor when the
        rows of a batch sit at different positions (batched decode); then the caller passes the
        boolean attention mask (B, 1, T, S) that says which cached keys each row may see.
        A pipeline stage before the last returns its hidden states (B, T, dim) for the next stage.
        """
        h = self.hidden(tokens, start_pos, cache, mask, last_only=last_only)
        if self.norm is None:
            return h
        if self.output is None:  # tied: project with the embedding matrix
            return F.linear(h, self.tok_embeddings.weight).float()
        return self.output(h).float()  # a module call, so a quantized output layer runs its own kernel

    def hidden(
        self,
        x: torch.Tensor,
        start_pos: int | torch.Tensor = 0,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        *,
        last_only: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> final-norm hidden states (B, T, dim): the output projection's input.

        Arguments as in forward; rope is (cos, sin) precomputed by rope_tables (a compiled trunk takes
        them as inputs). In a pipeline stage x is the previous stage's hidden states (B, T, dim) when
        there is no embedding, and the states leave un-normed when there is no final norm.
        """
        h = x if self.tok_embeddings is None else self.tok_embeddings(x)  # (B, T, dim)
        T = h.shape[1]
        cos, sin = rope if rope is not None else self.rope_tables(T, start_pos, h.device)  # (..., T, head_dim/2)
        if mask is None and cache is not None and T > 1 and isinstance(start_pos, int) and start_pos > 0:
            mask = causal_mask(start_pos, T, h.device)
        for layer in self.blocks():
            h = layer(h, cos, sin, mask, cache, start_pos)
        if last_only:
            h = h[:, -1:]
        return h if self.norm is None else self.norm(h)

    def rope_tables(self, T: int, start_pos: int | torch.Tensor = 0, device: torch.device | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, head_dim/2) of positions start_pos.., or (B, T, head_dim/2) for a (B,) start_pos."""
        offsets = torch.arange(T, device=device)
        positions = offsets + start_pos if isinstance(start_pos, int) else start_pos[:, None] + offsets  # (T,)|(B, T)
        return rope_angles(rope_frequencies(self.config, device), positions)

    def blocks(self) -> Iterable[Block]:
        """The blocks in order (a pruned pipeline stage keeps them in a ModuleDict)."""
        return self.layers.values() if isinstance(self.layers, nn.ModuleDict) else self.layers


def causal_mask(start_pos: int, T: int, device: torch.device) -> torch.Tensor:
    """Boolean (T, start_pos + T): query i (at start_pos + i) sees keys 0..start_pos + i."""
    query_pos = torch.arange(start_pos, start_pos + T, device=device)[:, None]
    key_pos = torch.arange(start_pos + T, device=device)[None, :]
    return key_pos <= query_pos


def init_weights_(model: Transformer, std: float = 0.02) -> Transformer:
    """Fresh weights for training from scratch: normal(0, std) matrices, unit norms."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
        else:
            nn.init.normal_(p, mean=0.0, std=std)
    return model
