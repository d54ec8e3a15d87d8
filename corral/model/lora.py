"""LoRA as a transform on a finished Transformer (Hu et al. 2021, "LoRA", arXiv 2106.09685).

A target linear y = W x (W frozen, (out, in)) becomes y = W x + (alpha / r) * B A dropout(x), with
A (r, in) Kaiming-uniform and B (out, r) zeros, so the wrapped model starts out exactly equal to the
base (section 4.1 of the paper). Only A and B train: ``apply_lora`` freezes every other parameter.
``merge_lora`` folds W + (alpha / r) B A back into one dense weight for inference at base speed.

Targets are Meta module names relative to a block (``attention.wq`` ... ``feed_forward.w3``) plus the
model-level ``output``. The base may be a dense ``nn.Linear`` or any frozen module that maps (..., in)
to (..., out) with ``in_features``/``out_features`` and, for merging, ``dequantize()`` (the quantized
layers of corral.model.quant and corral.kernels): that is QLoRA (Dettmers et al. 2023, arXiv 2305.14314),
where the base stays in its 4- or 8-bit blocks and only the adapter is float.

Apply LoRA after loading and before fusing projections (corral.model.fuse leaves a LoRALinear alone),
before quantizing or compiling; never after apply_fused_projections_ (wq/wk/wv are gone then).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from corral.errors import ConfigError, FormatError

BLOCK_TARGETS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
TARGETS = (*BLOCK_TARGETS, "output")
ATTENTION_MLP = BLOCK_TARGETS  # the usual choice: every projection of every block


class LoRALinear(nn.Module):
    """base(x) + scale * lora_b(lora_a(dropout(x))), scale = alpha / rank; the base is frozen."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scale = rank, float(alpha), alpha / rank
        weight = getattr(base, "weight", None)
        if dtype is None:  # the base's float dtype; quantized bases (integer buffers) get float32 adapters
            dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32
        device = _device_of(base)
        self.lora_a = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)  # A (r, in)
        self.lora_b = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)  # B (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # A: Kaiming-uniform as nn.Linear's default (a = sqrt(5)); B = 0 so B A = 0 at the start.
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        a = self.lora_a.weight
        delta = self.lora_b(self.lora_a(self.dropout(x.to(a.dtype))))  # (..., in) -> (..., r) -> (..., out)
        return y + (delta * self.scale).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A (out, in) in float32: what merging adds to the base weight."""
        return (self.lora_b.weight.float() @ self.lora_a.weight.float()) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def _device_of(module: nn.Module) -> torch.device | None:
    for t in (*module.parameters(), *module.buffers()):
        return None if t.is_meta else t.device
    return None


def check_lora_args(targets: tuple[str, ...] | list[str], rank: int, alpha: float, dropout: float) -> None:
    """ConfigError naming the bad field: rank <= 0, negative alpha, dropout outside [0, 1), unknown target."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ConfigError(f"lora rank must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha < 0:
        raise ConfigError(f"lora alpha must be a finite number >= 0, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"lora dropout must be in [0, 1), got {dropout!r}")
    if isinstance(targets, str) or not targets:
        raise ConfigError(f"lora targets must be a non-empty list of module names, got {targets!r}")
    for target in targets:
        if target not in TARGETS:
            raise ConfigError(f"unknown lora target {target!r}; choose from {', '.join(TARGETS)}")


def apply_lora(model: nn.Module, targets: tuple[str, ...] | list[str] = ATTENTION_MLP, rank: int = 8,
               alpha: float = 16.0, dropout: float = 0.0, layers: Iterable[int] | None = None) -> nn.Module:
    """Wrap the `targets` of every block (and ``output`` if named) in LoRALinear; freeze the rest; returns model.

    ``layers`` limits the blocks (PEFT's layers_to_transform): adapting only the top blocks also ends the
    backward pass there, since nothing below needs a gradient. The model changes in place (its modules are
    replaced); the return value is for chaining.
    """
    check_lora_args(targets, rank, alpha, dropout)
    names = lora_module_names(model, targets)
    if layers is not None:
        chosen = {int(i) for i in layers}
        present = {int(n.split(".")[1]) for n in names if n.startswith("layers.")}
        if not chosen or not chosen <= present:
            raise ConfigError(f"lora layers {sorted(chosen)} are not all blocks of this model "
                              f"(it has {min(present, default=0)}..{max(present, default=-1)})")
        names = [n for n in names if not n.startswith("layers.") or int(n.split(".")[1]) in chosen]
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha, dropout))
    return model


def apply_lora_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor], alphas: Mapping[str, float],
                       dropout: float = 0.0) -> nn.Module:
    """Stack a trained adapter on `model`: wrap each module named in `alphas` and load its A and B; returns model.

    ``tensors`` holds "{module}.lora_a.weight" (r, in) and "{module}.lora_b.weight" (out, r) in Corral names
    and Meta layout (corral.checkpoint.adapter reads them from PEFT and GGUF files); the rank is A's row count.
    Everything is checked before the model changes; every other parameter is then frozen, as in apply_lora.
    """
    known = {f"{m}.lora_{ab}.weight" for m in alphas for ab in "ab"}
    for name in tensors:
        if name not in known:
            raise FormatError("adapter tensor names no module with an alpha", field=name)
    plan = [(name, *_checked_pair(model, name, tensors), alpha) for name, alpha in alphas.items()]
    for p in model.parameters():
        p.requires_grad_(False)
    for module_name, base, a, b, alpha in plan:
        check_lora_args([module_name.split(".", 2)[-1] if module_name != "output" else "output"],
                        a.shape[0], alpha, dropout)
        layer = LoRALinear(base, a.shape[0], alpha, dropout)
        with torch.no_grad():
            layer.lora_a.weight.copy_(a)
            layer.lora_b.weight.copy_(b)
        parent_name, _, attr = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
    return model


def _checked_pair(model: nn.Module, module_name: str, tensors: Mapping[str, torch.Tensor]
                  ) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The base module and the adapter's A (r, in), B (out, r) for it; FormatError naming what does not fit."""
    a, b = tensors.get(f"{module_name}.lora_a.weight"), tensors.get(f"{module_name}.lora_b.weight")
    if a is None or b is None or a.dim() != 2 or b.dim() != 2:
        raise FormatError("adapter needs a 2-d lora_a and lora_b for this module", field=module_name)
    try:
        base = model.get_submodule(module_name)
    except AttributeError:
        raise FormatError("adapter names a module this model does not have", field=module_name) from None
    for name, t, expected in ((f"{module_name}.lora_a.weight", a, (a.shape[0], base.in_features)),
                              (f"{module_name}.lora_b.weight", b, (base.out_features, a.shape[0]))):
        if tuple(t.shape) != expected:
            raise FormatError(f"adapter shape {tuple(t.shape)} does not fit the base model, which needs "
                              f"{expected}: an adapter made for another base?", field=name)
    return base, a, b


def lora_module_names(model: nn.Module, targets: tuple[str, ...] | list[str]) -> list[str]:
    """Full module names ("layers.3.attention.wq", "output") the targets name in this model."""
    blocks = model.layers.items() if isinstance(model.layers, nn.ModuleDict) else enumerate(model.layers)
    names = []
    for i, block in blocks:
        for target in targets:
            if target == "output":
                continue
            parent_name, attr = target.split(".")
            parent = getattr(block, parent_name)
            if not hasattr(parent, attr):  # fused (wqkv / w13): the separate projections are gone
                raise ConfigError(f"layers.{i}.{target} does not exist (projections fused?); apply LoRA "
                                  "before apply_fused_projections_")
            names.append(f"layers.{i}.{target}")
    if "output" in targets:
        if getattr(model, "output", None) is None:
            raise ConfigError("lora target 'output' needs an output projection; this model ties it to the "
                              "embedding (tie_embeddings) or is a pipeline stage without one")
        names.append("output")
    return names


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter: "{module}.lora_a.weight" (r, in) and "{module}.lora_b.weight" (out, r) tensors."""
    return {k: v for k, v in model.state_dict().items() if ".lora_a." in k or ".lora_b." in k}


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace each LoRALinear by a dense nn.Linear holding W + (alpha / r) B A; returns model.

    A quantized base is widened to its float32 weight first (its ``dequantize()``), so the merged layer
    is dense; re-quantize afterwards if wanted. The merged weight keeps the base's float dtype.
    """
    for name, module in lora_modules(model).items():
        base = module.base
        if isinstance(base, nn.Linear):
            weight = base.weight
            merged = (weight.detach().float() + module.delta_weight()).to(weight.dtype)
            bias = base.bias
        elif hasattr(base, "dequantize"):
            merged, bias = base.dequantize().float() + module.delta_weight(), None
        else:
            raise ConfigError(f"{name}: cannot merge into a {type(base).__name__} (no weight or dequantize())")
        linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(merged, requires_grad=False)
        if bias is not None:
            linear.bias = bias
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, linear)
    return model
