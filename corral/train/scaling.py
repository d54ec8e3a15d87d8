"""Scaling laws: fit L(N, D) = E + A / N^alpha + B / D^beta to small runs and predict a larger one.

N is the number of non-embedding parameters (Kaplan et al. 2020, arXiv 2001.08361: it gives
cleaner laws for small models, whose embeddings are a large share of all weights), D the
training tokens, L the validation loss in nats per token. Training compute is C = 6 N D FLOPs
(forward 2 N D, backward 4 N D).

The fit is Chinchilla's approach 3 (Hoffmann et al. 2022, arXiv 2203.15556, appendix D.2):
minimize the Huber loss (delta = 1e-3) between log L and
log L_hat = logsumexp(a - alpha log N, b - beta log D, e), with A = e^a, B = e^b, E = e^e,
started from a grid of initial points, keeping the best. SciPy is not a dependency, so the
optimizer is torch: Adam on every grid point at once (vectorized), then Levenberg-Marquardt on the best few.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from corral.errors import ConfigError, FormatError
from corral.model.config import ModelConfig


def non_embedding_params(config: ModelConfig) -> int:
    """N for the law: every parameter except the token embedding and the output projection."""
    embed = config.vocab_size * config.dim * (1 if config.tie_embeddings else 2)
    return config.num_params() - embed


@dataclass
class ScalingRun:
    """One finished run of a sweep (or the held-out check): its size, its data and its loss."""

    name: str
    n_params: int
    """N: non-embedding parameters."""
    tokens: int
    """D: training tokens seen."""
    val_loss: float
    """Validation loss at the end of training, nats per token."""
    budget: float = 0.0
    """The compute budget C the sweep scheduled this run for (0 for a run outside the grid)."""
    model: dict = field(default_factory=dict)
    """The model fields the run set (dim, n_layers, n_heads)."""
    steps: int = 0
    seconds: float = 0.0

    @property
    def flops(self) -> float:
        return 6.0 * self.n_params * self.tokens


@dataclass(frozen=True)
class ScalingLaw:
    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def loss(self, n_params: float, tokens: float) -> float:
        """Predicted loss of a model with N non-embedding parameters trained on D tokens."""
        return self.E + self.A / n_params**self.alpha + self.B / tokens**self.beta

    def optimum(self, flops: float) -> tuple[float, float]:
        """The compute-optimal (N, D) for C = 6 N D (Hoffmann et al. 2022, eq. 4):
        N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = (C/6)^(alpha/(alpha+beta)) / G,
        G = (alpha A / (beta B))^(1/(alpha+beta))."""
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        return g * (flops / 6.0) ** (self.beta / s), (flops / 6.0) ** (self.alpha / s) / g


def _log_pred(theta: torch.Tensor, log_n: torch.Tensor, log_d: torch.Tensor) -> torch.Tensor:
    """theta (K, 5) = (a, alpha, b, beta, e) -> log L_hat (K, R) for R runs."""
    a, alpha, b, beta, e = (theta[:, i : i + 1] for i in range(5))
    terms = torch.stack([a - alpha * log_n, b - beta * log_d, e.expand(-1, log_n.numel())])  # (3, K, R)
    return torch.logsumexp(terms, dim=0)


def _objective(theta, log_n, log_d, log_l, delta: float) -> torch.Tensor:
    """Summed Huber loss of the log residuals, per initial point: (K,)."""
    resid = _log_pred(theta, log_n, log_d) - log_l
    return torch.nn.functional.huber_loss(resid, torch.zeros_like(resid), delta=delta, reduction="none").sum(1)


def _initial_grid() -> torch.Tensor:
    """Chinchilla's grid of starting points: alpha, beta in 0..2, e in -1..1.5, a, b in 0..25. (K, 5)"""
    exps = torch.arange(0.0, 2.01, 0.5)
    e0 = torch.arange(-1.0, 1.51, 0.5)
    ab = torch.arange(0.0, 25.1, 5.0)
    grid = torch.cartesian_prod(ab, exps, ab, exps, e0)  # columns a, alpha, b, beta, e
    return grid.double()


def _adam(theta: torch.Tensor, data: tuple, delta: float, steps: int = 300, lr: float = 0.05) -> torch.Tensor:
    """Plain Adam on every row of theta at once (written out: torch.optim's first use costs seconds of imports)."""
    m, v = torch.zeros_like(theta), torch.zeros_like(theta)
    for t in range(1, steps + 1):
        theta = theta.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(_objective(theta, *data, delta).sum(), theta)
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad * grad
        theta = theta - lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
    return theta.detach()


def _jacobian(theta: torch.Tensor, log_n: torch.Tensor, log_d: torch.Tensor) -> torch.Tensor:
    """d log L_hat / d (a, alpha, b, beta, e): the softmax weights p of the three terms. (K, R, 5)"""
    a, alpha, b, beta, e = (theta[:, i : i + 1] for i in range(5))
    terms = torch.stack([a - alpha * log_n, b - beta * log_d, e.expand(-1, log_n.numel())], dim=-1)
    p = torch.softmax(terms, dim=-1)  # (K, R, 3)
    ln, ld = log_n.expand_as(p[..., 0]), log_d.expand_as(p[..., 0])
    return torch.stack([p[..., 0], -p[..., 0] * ln, p[..., 1], -p[..., 1] * ld, p[..., 2]], dim=-1)


def _levenberg_marquardt(theta: torch.Tensor, data: tuple, delta: float, iters: int = 200) -> torch.Tensor:
    """Refine each row by Levenberg-Marquardt on the Huber objective, as iteratively reweighted least
    squares: a residual r beyond delta gets weight delta/|r|, so the stationary point is Huber's."""
    log_n, log_d, log_l = data
    lam = torch.full((theta.shape[0], 1, 1), 1e-3, dtype=theta.dtype)
    obj = _objective(theta, *data, delta)
    eye = torch.eye(5, dtype=theta.dtype)
    for _ in range(iters):
        r = _log_pred(theta, log_n, log_d) - log_l  # (K, R)
        w = torch.where(r.abs() <= delta, torch.ones_like(r), delta / r.abs().clamp_min(1e-300))
        J = _jacobian(theta, log_n, log_d)  # (K, R, 5)
        jtw = J.transpose(1, 2) * w[:, None, :]  # (K, 5, R)
        hess = jtw @ J
        hess = hess + lam * (torch.diagonal(hess, dim1=1, dim2=2)[..., None] * eye + 1e-12 * eye)
        step = torch.linalg.solve(hess, -(jtw @ r[..., None]))[..., 0]  # (K, 5)
        candidate = theta + step
        new_obj = _objective(candidate, *data, delta)
        better = torch.isfinite(new_obj) & (new_obj < obj)
        theta = torch.where(better[:, None], candidate, theta)
        obj = torch.where(better, new_obj, obj)
        lam = torch.where(better[:, None, None], lam / 3, lam * 4).clamp(1e-12, 1e12)
    return theta


def fit_scaling_law(
    n_params: list[float], tokens: list[float], losses: list[float], delta: float = 1e-3,
    starts: int = 512, refine: int = 32,
) -> ScalingLaw:
    """Fit E, A, alpha, B, beta to runs (N_i, D_i, L_i); at least 5 runs with 2+ sizes and 2+ token counts."""
    if not (len(n_params) == len(tokens) == len(losses)) or len(losses) < 5:
        raise ConfigError(f"a fit needs at least 5 runs of equal-length N, D, L; got {len(n_params)}, "
                          f"{len(tokens)}, {len(losses)}")
    if len(set(n_params)) < 2 or len(set(tokens)) < 2:
        raise ConfigError("the runs must vary both N and D to separate the two terms")
    if min(min(n_params), min(tokens), min(losses)) <= 0:
        raise ConfigError("N, D and the losses must all be positive")
    data = tuple(torch.tensor(x, dtype=torch.float64).log()[None, :] for x in (n_params, tokens, losses))  # (1, R)
    with torch.no_grad():
        grid = _initial_grid()
        grid = grid[torch.argsort(_objective(grid, *data, delta))[:starts]]  # the most promising starts
    theta = _adam(grid, data, delta)  # all of them at once, vectorized
    with torch.no_grad():
        best = torch.argsort(_objective(theta, *data, delta))[:refine]
        theta = _levenberg_marquardt(theta[best], data, delta)
        a, alpha, b, beta, e = theta[int(torch.argmin(_objective(theta, *data, delta)))].tolist()
    return ScalingLaw(E=math.exp(e), A=math.exp(a), alpha=alpha, B=math.exp(b), beta=beta)


def fit_runs(runs: list[ScalingRun], delta: float = 1e-3) -> ScalingLaw:
    return fit_scaling_law([r.n_params for r in runs], [r.tokens for r in runs], [r.val_loss for r in runs], delta)


# --- the sweep file: {"runs": [...], ...} --------------------------------------------------


def save_runs(path: str | Path, runs: list[ScalingRun], extra: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {**(extra or {}), "runs": [asdict(r) for r in runs]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)  # a sweep killed mid-write keeps its previous file whole


def load_runs(path: str | Path) -> tuple[list[ScalingRun], dict]:
    """The runs of a sweep file and its other top-level keys; FormatError naming the file if malformed."""
    path = Path(path)
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        runs = [ScalingRun(**r) for r in body.pop("runs")]
    except FileNotFoundError:
        raise FormatError(f"{path}: no sweep file here (run `corral scaling sweep` first)", path=str(path)) from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise FormatError(f"{path}: not a sweep file ({type(exc).__name__}: {exc})", path=str(path),
                          field="runs") from None
    return runs, body


# --- the picture ---------------------------------------------------------------------------


def plot_fit(runs: list[ScalingRun], law: ScalingLaw, path: str | Path,
             held_out: ScalingRun | None = None, predicted: float | None = None) -> Path:
    """Loss against N, one colour per compute budget, with the fitted iso-FLOP curves L(N, C / 6N),
    each curve's optimum, and the held-out run (measured and predicted) if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r.budget for r in runs if r.budget > 0}) or sorted({r.flops for r in runs})
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    cmap = plt.get_cmap("viridis")
    sizes = [r.n_params for r in runs] + ([held_out.n_params] if held_out else [])
    grid = torch.logspace(math.log10(min(sizes) / 2), math.log10(max(sizes) * 2), 200).tolist()
    for i, c in enumerate(budgets):
        colour = cmap(i / max(1, len(budgets) - 1))
        mine = [r for r in runs if (r.budget or r.flops) == c]
        ax.scatter([r.n_params for r in mine], [r.val_loss for r in mine], color=colour, zorder=3)
        ax.plot(grid, [law.loss(n, c / (6 * n)) for n in grid], color=colour, lw=1, label=f"C = {c:.1e}")
        n_opt, d_opt = law.optimum(c)
        ax.scatter([n_opt], [law.loss(n_opt, d_opt)], color=colour, marker="*", s=90, zorder=4)
    if held_out is not None:
        c = held_out.flops
        ax.plot(grid, [law.loss(n, c / (6 * n)) for n in grid], color="crimson", lw=1, ls="--",
                label=f"held out, C = {c:.1e}")
        ax.scatter([held_out.n_params], [held_out.val_loss], color="crimson", marker="o", zorder=5,
                   label=f"measured {held_out.val_loss:.3f}")
        if predicted is not None:
            ax.scatter([held_out.n_params], [predicted], color="crimson", marker="x", s=70, zorder=5,
                       label=f"predicted {predicted:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"L = {law.E:.2f} + {law.A:.3g}/N^{law.alpha:.2f} + {law.B:.3g}/D^{law.beta:.2f}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
