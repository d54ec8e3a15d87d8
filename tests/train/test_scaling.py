"""Scaling laws: the fit recovers known laws, the optima are right, a real sweep predicts its held-out run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from corral.errors import ConfigError, FormatError
from corral.train.scaling import (
    ScalingLaw,
    ScalingRun,
    fit_runs,
    fit_scaling_law,
    load_runs,
    non_embedding_params,
    plot_fit,
    save_runs,
)
from corral.train.scaling_sweep import _pretrain_config, load_sweep_config, plan_runs, tokens_per_step

DATA = Path(__file__).resolve().parents[1] / "data" / "scaling"
REPO = Path(__file__).resolve().parents[2]
CHINCHILLA = ScalingLaw(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)  # Hoffmann et al. 2022, eq. 10


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def grid(law: ScalingLaw, ns: list[float], ds: list[float], noise: float = 0.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    points = [(n, d) for n in ns for d in ds]
    losses = [law.loss(n, d) * (1 + noise * float(torch.randn((), generator=g))) for n, d in points]
    return [n for n, _ in points], [d for _, d in points], losses


def test_fit_recovers_chinchilla_parameters_from_exact_losses():
    n, d, loss = grid(CHINCHILLA, [1e6, 3e6, 1e7, 3e7, 1e8, 3e8, 1e9], [1e8, 1e9, 1e10, 1e11])
    fit = fit_scaling_law(n, d, loss)
    for name in ("E", "A", "alpha", "B", "beta"):
        assert getattr(fit, name) == pytest.approx(getattr(CHINCHILLA, name), rel=1e-4), name


def test_fit_recovers_small_model_law_from_noisy_losses():
    true = ScalingLaw(E=1.2, A=30.0, alpha=0.5, B=60.0, beta=0.35)
    n, d, loss = grid(true, [1.3e4, 5e4, 1e5, 3e5, 8e5], [5e4, 1e5, 3e5, 1e6], noise=0.002)
    fit = fit_scaling_law(n, d, loss)
    assert fit.alpha == pytest.approx(true.alpha, abs=0.05)
    assert fit.beta == pytest.approx(true.beta, abs=0.05)
    assert fit.E == pytest.approx(true.E, abs=0.1)
    # What matters downstream: the prediction 10x beyond the grid.
    assert fit.loss(8e6, 1e7) == pytest.approx(true.loss(8e6, 1e7), rel=0.01)


def test_optimum_is_the_minimum_of_the_isoflop_curve():
    c = 5.76e23  # Chinchilla's compute
    n_opt, d_opt = CHINCHILLA.optimum(c)
    assert 6 * n_opt * d_opt == pytest.approx(c, rel=1e-9)
    curve = [(CHINCHILLA.loss(n, c / (6 * n)), n) for n in torch.logspace(9, 12, 3001).tolist()]
    best_loss, best_n = min(curve)
    assert n_opt == pytest.approx(best_n, rel=0.01)
    assert CHINCHILLA.loss(n_opt, d_opt) <= best_loss + 1e-12


def test_fit_too_few_runs_raises_config_error():
    with pytest.raises(ConfigError, match="at least 5 runs"):
        fit_scaling_law([1e6, 2e6], [1e9, 1e9], [3.0, 2.9])


def test_fit_runs_of_one_size_raises_config_error():
    with pytest.raises(ConfigError, match="vary both N and D"):
        fit_scaling_law([1e6] * 5, [1e8, 2e8, 3e8, 4e8, 5e8], [3.0, 2.9, 2.8, 2.7, 2.6])


def test_load_runs_of_malformed_file_raises_format_error(tmp_path):
    bad = tmp_path / "sweep.json"
    bad.write_text('{"runs": [{"name": "x"}]}')
    with pytest.raises(FormatError, match="not a sweep file"):
        load_runs(bad)
    with pytest.raises(FormatError, match="no sweep file"):
        load_runs(tmp_path / "missing.json")


def test_runs_round_trip_and_plot_is_a_png(tmp_path):
    n, d, loss = grid(CHINCHILLA, [1e6, 1e7, 1e8], [1e8, 1e9])
    runs = [ScalingRun(f"r{i}", int(a), int(b), c, budget=6 * a * b) for i, (a, b, c) in enumerate(zip(n, d, loss))]
    save_runs(tmp_path / "sweep.json", runs, {"note": "x"})
    again, extra = load_runs(tmp_path / "sweep.json")
    assert again == runs and extra == {"note": "x"}
    png = plot_fit(runs, CHINCHILLA, tmp_path / "fit.png", held_out=runs[-1], predicted=runs[-1].val_loss)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_config_unknown_key_raises_config_error(tmp_path):
    bad = tmp_path / "s.toml"
    bad.write_text('budgets = [1e9]\nmodels = [{dim = 32}]\ntrain = ["a"]\nval = ["b"]\nbudget = 3\n')
    with pytest.raises(ConfigError, match="unknown scaling config key 'budget'"):
        load_sweep_config(bad)


def test_planned_runs_spend_their_budget_within_step_limits():
    config = load_sweep_config(REPO / "configs" / "scaling" / "tiny.toml")
    plan = plan_runs(config)
    assert len({b for _, b, _, _ in plan}) == len(config.budgets)
    per_step = tokens_per_step(config)
    for name, budget, model, steps in plan:
        assert config.min_steps <= steps <= config.max_steps
        n = non_embedding_params(_pretrain_config(config, name, model, steps, (["-"], ["-"])).model)
        assert 6 * n * steps * per_step == pytest.approx(budget, rel=0.5 / config.min_steps + 1e-9)


def test_committed_sweep_predicts_held_out_run_within_5_percent():
    """tests/data/scaling: 14 runs written by `corral scaling sweep configs/scaling/tiny.toml` and the
    held-out target written by `corral scaling check` (see docs/scaling.md). Refit, predict, compare."""
    runs, _ = load_runs(DATA / "tiny_sweep.json")
    held_out = ScalingRun(**json.loads((DATA / "tiny_check.json").read_text())["run"])
    assert held_out.n_params > max(r.n_params for r in runs)
    assert held_out.flops > 2 * max(r.flops for r in runs)
    law = fit_runs(runs)
    predicted = law.loss(held_out.n_params, held_out.tokens)
    assert abs(predicted - held_out.val_loss) / held_out.val_loss < 0.05
    assert 0 < law.alpha < 2 and 0 < law.beta < 2 and math.isfinite(law.E)
    # Not degenerate: an irreducible loss well above 0, and the smallest budget's optimum inside its profile.
    assert 1.0 < law.E < min(r.val_loss for r in runs)
    smallest = [r.n_params for r in runs if r.budget == min(r.budget for r in runs)]
    assert min(smallest) < law.optimum(min(r.budget for r in runs))[0] < max(smallest)


def _cli(argv: list[str]) -> int:
    from corral.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.handler(args)


@pytest.mark.slow
def test_scaling_commands_sweep_fit_check_end_to_end(tmp_path, capsys):
    """The three commands on a micro grid (7 runs of 23-194 steps): files appear and the numbers are sane."""
    corpus = REPO / "data" / "corpus"
    text = (tmp_path / "train.txt")
    text.write_bytes((corpus / "tinyshakespeare.txt").read_bytes()[:400_000])
    config = tmp_path / "micro.toml"
    config.write_text(f"""
out_dir = "{tmp_path / 'out'}"
train = ["{text}"]
val = ["{corpus / 'gutenberg' / 'alice_in_wonderland.txt'}"]
budgets = [2e9, 4e9, 8e9]
min_steps = 20
max_steps = 200
models = [{{dim = 16, n_layers = 1, n_heads = 1}}, {{dim = 32, n_layers = 1, n_heads = 2}},
          {{dim = 48, n_layers = 2, n_heads = 3}}, {{dim = 64, n_layers = 2, n_heads = 4}}]
[target]
dim = 64
n_layers = 3
n_heads = 4
tokens = 40960
[pretrain.model]
multiple_of = 16
max_seq_len = 32
[pretrain.data]
seq_len = 32
batch_size = 16
[pretrain.optim]
lr = 3e-3
warmup_steps = 5
[pretrain.train]
threads = 1
log_every = 50
val_batches = 4
progress = false
tensorboard = false
""")
    assert _cli(["scaling", "sweep", str(config)]) == 0
    runs, _ = load_runs(tmp_path / "out" / "sweep.json")
    assert len(runs) == len(plan_runs(load_sweep_config(config))) == 7
    assert _cli(["scaling", "fit", str(config)]) == 0
    fit = json.loads((tmp_path / "out" / "fit.json").read_text())
    assert fit["target"]["predicted_loss"] > fit["law"]["E"] > 0
    capsys.readouterr()
    code = _cli(["scaling", "check", str(config), "--tolerance", "1.0"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and math.isfinite(report["relative_error"])
    assert report["measured_loss"] < runs[0].val_loss + 1.0
    assert (tmp_path / "out" / "fit.png").read_bytes()[:4] == b"\x89PNG"
