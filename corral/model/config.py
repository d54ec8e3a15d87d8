"""Model shape, named exactly as Meta's ``params.json``.

The Llama 3 family differs only in these numbers (REFERENCE.md has the table), so every
preset is a plain dict literal below; HF ``config.json`` and GGUF metadata are translated
into these names at the checkpoint boundary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from corral.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 4096
    """Width of the residual stream."""
    n_layers: int = 32
    """Number of transformer blocks."""
    n_heads: int = 32
    """Query heads per attention layer."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None means n_heads (plain MHA)."""
    vocab_size: int = 128256
    """Rows of the embedding and of the output projection."""
    multiple_of: int = 256
    """The SwiGLU hidden width is rounded up to a multiple of this."""
    ffn_dim_multiplier: float | None = None
    """Scales the SwiGLU hidden width before rounding (1.3 for 8B/70B)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 500000.0
    """RoPE base frequency."""
    use_scaled_rope: bool = False
    """Llama 3.1 frequency scaling for long context."""
    rope_scaling_factor: float = 8.0
    """Divides low frequencies when use_scaled_rope (8 for 3.1, 32 for 3.2 1B/3B)."""
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_old_context_len: int = 8192
    """The context length the frequencies were trained for before scaling."""
    max_seq_len: int = 8192
    """Longest context the model was trained for (the engine may use less)."""
    tie_embeddings: bool = False
    """The output projection reuses tok_embeddings.weight (Llama 3.2 1B/3B, SmolLM2)."""
    ffn_hidden_dim: int | None = None
    """Explicit SwiGLU width for checkpoints whose width the Meta formula does not give."""
    head_dim_override: int | None = field(default=None, repr=False)
    """Explicit head size where it is not dim / n_heads (rare; GGUF key_length)."""

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_kv_heads is not None and (
            not isinstance(self.n_kv_heads, int) or self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads
        ):
            raise ConfigError(f"n_kv_heads={self.n_kv_heads!r} must be a positive divisor of n_heads={self.n_heads}")
        if self.head_dim_override is None and self.dim % self.n_heads:
            raise ConfigError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not (isinstance(self.norm_eps, (int, float)) and math.isfinite(self.norm_eps) and self.norm_eps > 0):
            raise ConfigError(f"norm_eps must be a positive finite number, got {self.norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and math.isfinite(self.rope_theta) and self.rope_theta > 1):
            raise ConfigError(f"rope_theta must be a finite number > 1, got {self.rope_theta!r}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width: int(2*4*dim/3), times ffn_dim_multiplier, rounded up to multiple_of."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def num_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        embed = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + embed + self.dim

    @classmethod
    def from_params(cls, params: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Build from a Meta ``params.json`` dict; unknown keys are ignored only if known to Meta."""
        known = {f.name for f in dataclasses.fields(cls)}
        # Keys Meta's params.json carries that are not model shape.
        harmless = {"max_batch_size", "model_parallel_size", "quantization_args", "lora_args", "vision_chunk_size",
                    "vision_max_num_chunks", "vision_num_cross_attention_layers"}
        unknown = set(params) - known - harmless
        if unknown:
            raise ConfigError(f"params.json has unknown keys: {sorted(unknown)}")
        values = {k: v for k, v in params.items() if k in known}
        if values.get("use_scaled_rope") is True:
            # Meta's params.json only switches scaling on. Every release that uses it runs 131,072 tokens,
            # and the 3.2 1B/3B shapes scale by 32 (their HF configs say so), the 3.1 models by 8.
            values.setdefault("max_seq_len", 131072)
            if (values.get("dim"), values.get("n_layers")) in {(2048, 16), (3072, 28)}:
                values.setdefault("rope_scaling_factor", 32.0)
        values.update(overrides)
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"params.json: {exc}") from None

    def to_params(self) -> dict[str, Any]:
        """The Meta ``params.json`` view: only fields that differ from the defaults, plus the core shape."""
        core = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                "norm_eps", "rope_theta", "use_scaled_rope"}
        defaults = ModelConfig()
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in core or value != getattr(defaults, f.name):
                out[f.name] = value
        return out


_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5)
_SCALED = dict(use_scaled_rope=True, max_seq_len=131072)

PRESETS: dict[str, ModelConfig] = {
    "llama3-8b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3,
                             multiple_of=1024, max_seq_len=8192, **_LLAMA3),
    "llama3-70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                              multiple_of=4096, max_seq_len=8192, **_LLAMA3),
    "llama3.1-8b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3,
                               multiple_of=1024, **_SCALED, **_LLAMA3),
    "llama3.1-70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                                multiple_of=4096, **_SCALED, **_LLAMA3),
    "llama3.1-405b": ModelConfig(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim_multiplier=1.2,
                                 multiple_of=4096, **_SCALED, **_LLAMA3),
    "llama3.2-1b": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5,
                               multiple_of=256, rope_scaling_factor=32.0, tie_embeddings=True, **_SCALED, **_LLAMA3),
    "llama3.2-3b": ModelConfig(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0,
                               multiple_of=256, rope_scaling_factor=32.0, tie_embeddings=True, **_SCALED, **_LLAMA3),
    # SmolLM2-135M: a Llama architecture with its own 49,152-token BPE; the embedded default.
    "smollm2-135m": ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                                ffn_hidden_dim=1536, rope_theta=100000.0, norm_eps=1e-5, max_seq_len=8192,
                                tie_embeddings=True),
    # Small enough to train on a laptop CPU in minutes; keeps the Llama 3 vocabulary and GQA ratio.
    "debug": ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, multiple_of=64, max_seq_len=2048,
                         **_LLAMA3),
}
