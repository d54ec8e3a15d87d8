"""Rotary position embeddings (Su et al. 2021, arXiv 2104.09864) with Llama 3.1 frequency scaling.

Meta's layout rotates adjacent pairs (x[2i], x[2i+1]); the angles are computed from the
positions on every forward, which costs T x head_dim/2 multiplies and keeps no
max-length table in the model (a 131,072-token table would be 64 MB per dtype).
"""

from __future__ import annotations

import math

import torch

from corral.model.config import ModelConfig


def apply_llama31_scaling(freqs: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Stretch the low frequencies for long context, leave the high ones (Llama 3.1 report, section 3.3)."""
    low_wavelen = config.rope_old_context_len / config.rope_low_freq_factor
    high_wavelen = config.rope_old_context_len / config.rope_high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (config.rope_old_context_len / wavelen - config.rope_low_freq_factor) / (
        config.rope_high_freq_factor - config.rope_low_freq_factor
    )
    blended = (1 - smooth) * freqs / config.rope_scaling_factor + smooth * freqs
    scaled = torch.where(wavelen > low_wavelen, freqs / config.rope_scaling_factor, blended)
    return torch.where(wavelen < high_wavelen, freqs, scaled)


def rope_frequencies(config: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """theta^(-2i/head_dim) for i in [0, head_dim/2), float32, scaled when the config asks."""
    exponents = torch.arange(0, config.head_dim, 2, device=device, dtype=torch.float32) / config.head_dim
    freqs = 1.0 / (config.rope_theta**exponents)
    return apply_llama31_scaling(freqs, config) if config.use_scaled_rope else freqs


def rope_angles(freqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency: (..., T, head_dim/2) each, float32, for positions (..., T)."""
    angles = positions.to(torch.float32)[..., None] * freqs
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (B, T, H, head_dim) by the angles (T or B, T, head_dim/2), in float32.

    Each pair (x[2i], x[2i+1]) is the complex number x[2i] + j x[2i+1] times e^(j angle): one complex
    multiply instead of four real ones plus a stack, which matters at decode (60 calls per token).
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, T, H, head_dim/2)
    turn = torch.complex(cos, sin).unsqueeze(-2)  # broadcast over heads: (..., T, 1, head_dim/2)
    return torch.view_as_real(pairs * turn).flatten(-2).type_as(x)
