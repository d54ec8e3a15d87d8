"""The pretraining loss: next-token cross-entropy, with the output projection fused in row chunks.

The reference is ``F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())``. With Llama 3's
128,256-token vocabulary that materializes (B*T, vocab) float32 logits, then log-probabilities of
the same size, and in backward a zero-filled gradient and the softmax gradient: four arrays of
B*T x 128,256 x 4 bytes (256 MB each for 512 tokens) that are written and read once each. On a CPU
the page faults of those fresh allocations and the memory passes cost more than the matmul.

``linear_cross_entropy`` computes the loss and both gradients in one pass over row chunks (the
"fused linear cross-entropy" idea, e.g. Wijmans et al. 2024, arXiv 2411.09009): per chunk of rows
the logits z = h W^T (rows, vocab) go into one reused buffer, are turned in place into softmax
probabilities p, and since d loss / d z = (p - onehot(target)) / n the two gradient matmuls run on
that same buffer at once: dh = (p - y) W, dW += (p - y)^T h. Only (rows, vocab) floats are ever
live; the exponentials are computed once instead of twice. ``backward`` just scales the saved
gradients by the incoming one (grad-accumulation's 1/k).

``sequence_logprobs`` gives each position's log p(target) through the same chunked projection (DPO,
reward models, PPO and multiple-choice evaluation score sequences with it). Its gradient depends on the
incoming per-token gradient, so backward recomputes each chunk's logits from the saved log-sum-exp
instead of keeping them: dz = g (onehot - p), then the same two matmuls.

Both losses take the output projection over from the model: it runs ``Transformer.hidden`` (the trunk
that ``forward`` also runs) and projects in chunks itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
"""Targets equal to this add nothing to the loss (as in F.cross_entropy)."""


def output_weight(model: nn.Module) -> torch.Tensor:
    """The (vocab, dim) output projection: the embedding itself when tied (Llama 3.2 1B/3B)."""
    return model.tok_embeddings.weight if model.output is None else model.output.weight


def _chunk_(z: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Logits z (rows, vocab) -> in place (p - onehot) * scale; returns each row's loss (rows,).

    scale (rows, 1) is 1/n for counted rows and 0 for ignored ones (their gradient vanishes).
    """
    rows = torch.arange(z.shape[0], device=z.device)
    safe = targets.clamp(min=0)  # ignored rows index 0; their loss and gradient are zeroed by scale
    target_logit = z[rows, safe]  # (rows,) a copy, taken before z is overwritten
    peak = z.amax(dim=1, keepdim=True)  # (rows, 1) subtracted so exp cannot overflow
    z.sub_(peak).exp_()
    total = z.sum(dim=1, keepdim=True)  # (rows, 1)
    loss = (total.log() + peak).squeeze(1) - target_logit  # log-sum-exp - z_target
    z.mul_(scale / total)  # softmax probabilities, times 1/n
    z[rows, safe] -= scale.squeeze(1)
    return loss * (scale.squeeze(1) > 0)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                with_grads: bool) -> torch.Tensor:
        # h (N, dim), weight (vocab, dim), targets (N,). float32 throughout: autocast does not reach here.
        n_rows = h.shape[0]
        counted = targets != IGNORE_INDEX  # (N,)
        scale = (counted / counted.sum().clamp(min=1)).to(torch.float32)[:, None]  # (N, 1)
        buffer = torch.empty(min(chunk_rows, n_rows), weight.shape[0], device=h.device)  # (rows, vocab)
        grad_h = torch.empty_like(h) if with_grads else None
        grad_w = torch.empty_like(weight) if with_grads else None
        loss = torch.zeros((), device=h.device)
        for start in range(0, n_rows, chunk_rows):
            hc = h[start:start + chunk_rows]  # (rows, dim)
            z = torch.mm(hc, weight.t(), out=buffer[: hc.shape[0]])  # (rows, vocab)
            loss += _chunk_(z, targets[start:start + chunk_rows], scale[start:start + chunk_rows]).sum()
            if with_grads:
                torch.mm(z, weight, out=grad_h[start:start + chunk_rows])  # (rows, dim)
                if start == 0:
                    torch.mm(z.t(), hc, out=grad_w)  # (vocab, dim): the first chunk needs no zero fill
                else:
                    grad_w.addmm_(z.t(), hc)
        if with_grads:
            ctx.save_for_backward(grad_h, grad_w)
        return loss / counted.sum().clamp(min=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad, grad_w * grad, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int = 256) -> torch.Tensor:
    """mean cross_entropy(h @ weight^T, targets) over non-ignored rows, never holding more than
    (chunk_rows, vocab) logits. h (..., dim), weight (vocab, dim), targets (...); float32 math."""
    h2 = h.reshape(-1, h.shape[-1]).float()  # (N, dim)
    with_grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h2, weight.float(), targets.reshape(-1), max(1, chunk_rows), with_grads)


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        # h (N, dim), weight (vocab, dim), targets (N,) -> log p(target) (N,); float32, as above.
        n_rows = h.shape[0]
        buffer = torch.empty(min(chunk_rows, n_rows), weight.shape[0], device=h.device)  # (rows, vocab)
        lse = torch.empty(n_rows, device=h.device)  # (N,) kept for backward
        out = torch.empty(n_rows, device=h.device)
        safe = targets.clamp(min=0)  # ignored rows read class 0; their output and gradient are zeroed
        for start in range(0, n_rows, chunk_rows):
            stop = min(start + chunk_rows, n_rows)
            z = torch.mm(h[start:stop], weight.t(), out=buffer[: stop - start])  # (rows, vocab)
            lse[start:stop] = torch.logsumexp(z, dim=1)
            out[start:stop] = z.gather(1, safe[start:stop, None]).squeeze(1) - lse[start:stop]
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk_rows = chunk_rows
        return out * (targets != IGNORE_INDEX)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight, targets, lse = ctx.saved_tensors
        counted = targets != IGNORE_INDEX
        g = (grad * counted)[:, None]  # (N, 1)
        safe = targets.clamp(min=0)
        want_h, want_w = ctx.needs_input_grad[:2]  # a frozen output projection (reward model, LoRA) needs no dW
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        buffer = torch.empty(min(ctx.chunk_rows, h.shape[0]), weight.shape[0], device=h.device)
        for start in range(0, h.shape[0], ctx.chunk_rows):
            stop = min(start + ctx.chunk_rows, h.shape[0])
            hc, gc = h[start:stop], g[start:stop]
            z = torch.mm(hc, weight.t(), out=buffer[: stop - start])  # (rows, vocab) logits again
            z.sub_(lse[start:stop, None]).exp_().mul_(-gc)  # -g p
            z[torch.arange(stop - start, device=z.device), safe[start:stop]] += gc.squeeze(1)  # + g onehot
            if want_h:
                torch.mm(z, weight, out=grad_h[start:stop])  # (rows, dim)
            if want_w:
                grad_w.addmm_(z.t(), hc)  # (vocab, dim)
        return grad_h, grad_w, None, None


def linear_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 256
                    ) -> torch.Tensor:
    """log_softmax(h @ weight^T)[target] per row, never holding more than (chunk_rows, vocab) logits.

    h (..., dim), weight (vocab, dim), targets (...) -> float32 (...); IGNORE_INDEX targets give 0.
    """
    h2 = h.reshape(-1, h.shape[-1]).float()  # (N, dim)
    with torch.autocast(h.device.type, enabled=False):
        out = _LinearLogprobs.apply(h2, weight.float(), targets.reshape(-1), max(1, chunk_rows))
    return out.view(targets.shape)


def linear_logprobs_top(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 256
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_logprobs (no gradient) plus whether each target is the argmax, from the same logits chunk.

    h (N, dim), weight (vocab, dim), targets (N,) -> log p (N,) float32, is-argmax (N,) bool. One projection
    serves both (an evaluator needs both; projecting twice costs a second (N, vocab) matmul).
    """
    h2, w = h.float(), weight.float()
    out = torch.empty(h2.shape[0], device=h.device)
    top = torch.empty(h2.shape[0], dtype=torch.bool, device=h.device)
    safe = targets.clamp(min=0)
    for start in range(0, h2.shape[0], max(1, chunk_rows)):
        stop = min(start + chunk_rows, h2.shape[0])
        z = torch.mm(h2[start:stop], w.t())  # (rows, vocab), the same math as _LinearLogprobs.forward
        out[start:stop] = z.gather(1, safe[start:stop, None]).squeeze(1) - torch.logsumexp(z, dim=1)
        top[start:stop] = z.argmax(1) == safe[start:stop]
    return out * (targets != IGNORE_INDEX), top


def sequence_logprobs(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 256
                      ) -> torch.Tensor:
    """Per-token log p(targets | tokens) (B, T) float32 of a whole Transformer; IGNORE_INDEX targets give 0.

    tokens (B, T) are the inputs and targets (B, T) the tokens each position should predict (usually
    tokens shifted by one). Sum over T (masking the prompt with IGNORE_INDEX) for a sequence's log-likelihood.
    """
    h = model.hidden(tokens)  # (B, T, dim) final-norm hidden states
    return linear_logprobs(h, output_weight(model), targets, chunk_rows)


def reference_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain path: full float32 logits from the model's own forward, then cross-entropy."""
    logits = model(inputs)  # (B, T, vocab) float32
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def build_loss(model: nn.Module, chunk_rows: int, compile: bool = False, backend: str = "inductor"
               ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """loss(inputs, targets) for a whole single-process Transformer (plain or TP, not FSDP/pipeline).

    chunk_rows > 0 takes the fused chunked loss; compile compiles everything before the output
    projection as one graph (embedding, rotary angles, every block, final norm), which removes the
    per-op overhead that dominates small models; the chunked loss stays eager (it is matmuls and
    one exp pass already). chunk_rows = 0 is the reference path (the model's own forward).
    """
    if not chunk_rows:
        if compile:
            return torch.compile(lambda x, y: reference_loss(model, x, y), backend=backend)
        return lambda x, y: reference_loss(model, x, y)

    def trunk(tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return model.hidden(tokens, rope=(cos, sin))  # (B, T, dim)

    # The rotary tables are computed outside the compiled graph: inside it, inductor fuses cos/sin into
    # every consumer and recomputes them per (B, T, head) element in each layer, forward and backward.
    hidden = torch.compile(trunk, fullgraph=True, backend=backend) if compile else trunk

    def loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = hidden(inputs, *model.rope_tables(inputs.shape[1], device=inputs.device))  # (B, T, dim)
        return linear_cross_entropy(h, output_weight(model), targets, chunk_rows)

    return loss
