"""``corral scaling sweep|fit|check``: argparse wiring; the work is in corral.train.scaling(_sweep).

Only argparse and the standard library are imported at module level, so ``corral --help`` stays fast.

    corral scaling sweep configs/scaling/tiny.toml   # train the grid -> <out_dir>/sweep.json
    corral scaling fit   configs/scaling/tiny.toml   # fit L(N, D) -> fit.json, fit.png, the target's prediction
    corral scaling check configs/scaling/tiny.toml   # train the held-out target -> check.json, the error
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_sweep(args: argparse.Namespace) -> int:
    """Train the grid of small models over the compute budgets (resumes an interrupted sweep)."""
    from corral.train.scaling_sweep import load_sweep_config, plan_runs, run_sweep

    config = load_sweep_config(args.config)
    if args.dry_run:
        for name, budget, model, steps in plan_runs(config):
            print(f"{name}\tC={budget:.2e}\tsteps={steps}\t{model}")
        return 0
    runs = run_sweep(config, log=lambda line: print(line, file=sys.stderr))
    print(json.dumps({"runs": len(runs), "sweep": str(Path(config.out_dir) / "sweep.json")}))
    return 0


def fit_and_predict(config_path: str, sweep_path: str | None = None) -> dict:
    """Fit the sweep's runs; the law, each budget's compute-optimal (N, D) and the target's predicted loss."""
    from dataclasses import asdict

    from corral.train.scaling import fit_runs, load_runs
    from corral.train.scaling_sweep import load_sweep_config, target_run_spec

    config = load_sweep_config(config_path)
    runs, _ = load_runs(sweep_path or Path(config.out_dir) / "sweep.json")
    law = fit_runs(runs)
    optima = []
    for budget in sorted({r.budget for r in runs if r.budget > 0}):
        n, d = law.optimum(budget)
        optima.append({"flops": budget, "n_params": n, "tokens": d, "loss": law.loss(n, d)})
    report = {"law": asdict(law), "runs": len(runs), "optima": optima}
    if config.target:
        model, n, d = target_run_spec(config)
        n_opt, d_opt = law.optimum(6.0 * n * d)
        report["target"] = {"model": model, "n_params": n, "tokens": d, "flops": 6.0 * n * d,
                            "predicted_loss": law.loss(n, d),
                            "compute_optimal": {"n_params": n_opt, "tokens": d_opt, "loss": law.loss(n_opt, d_opt)}}
    return report


def cmd_fit(args: argparse.Namespace) -> int:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to the sweep, print the law, optima and the target's prediction."""
    from corral.train.scaling import ScalingLaw, load_runs, plot_fit
    from corral.train.scaling_sweep import load_sweep_config

    config = load_sweep_config(args.config)
    out = Path(config.out_dir)
    report = fit_and_predict(args.config, args.sweep)
    runs, _ = load_runs(args.sweep or out / "sweep.json")
    (out / "fit.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    plot = plot_fit(runs, ScalingLaw(**report["law"]), args.plot or out / "fit.png")
    print(json.dumps({**report, "plot": str(plot)}, indent=1))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Train the held-out target run and compare its validation loss with the fit's prediction."""
    from corral.train.scaling import ScalingLaw, ScalingRun, load_runs, plot_fit
    from corral.train.scaling_sweep import load_sweep_config, tokens_per_step, train_one

    config = load_sweep_config(args.config)
    out = Path(config.out_dir)
    report = fit_and_predict(args.config, args.sweep)
    if "target" not in report:
        from corral.errors import ConfigError

        raise ConfigError(f"{args.config} has no [target] table to check")
    target = report["target"]
    check_path = out / "check.json"
    if check_path.exists() and not args.retrain:
        measured = ScalingRun(**json.loads(check_path.read_text(encoding="utf-8"))["run"])
    else:
        steps = max(1, round(target["tokens"] / tokens_per_step(config)))
        measured = train_one(config, "target", target["model"], steps)
    predicted = target["predicted_loss"]
    error = (predicted - measured.val_loss) / measured.val_loss
    result = {"predicted_loss": predicted, "measured_loss": measured.val_loss, "relative_error": error,
              "tolerance": args.tolerance, "within_tolerance": abs(error) <= args.tolerance,
              "law": report["law"], "run": measured.__dict__}
    out.mkdir(parents=True, exist_ok=True)
    check_path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    runs, _ = load_runs(args.sweep or out / "sweep.json")
    plot_fit(runs, ScalingLaw(**report["law"]), out / "fit.png", held_out=measured, predicted=predicted)
    print(json.dumps({k: v for k, v in result.items() if k != "run"}, indent=1))
    return 0 if result["within_tolerance"] else 1


def sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="scaling TOML, e.g. configs/scaling/tiny.toml")
    p.add_argument("--dry-run", action="store_true", help="list the planned runs and exit")


def fit_arguments(p: argparse.ArgumentParser) -> None:
    _config_and_sweep(p)
    p.add_argument("--plot", default=None, help="PNG path (default: <out_dir>/fit.png)")


def check_arguments(p: argparse.ArgumentParser) -> None:
    _config_and_sweep(p)
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="largest acceptable relative error; exit 1 beyond it (default: 0.05)")
    p.add_argument("--retrain", action="store_true", help="train the target again even if check.json exists")


def _config_and_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="scaling TOML, e.g. configs/scaling/tiny.toml")
    p.add_argument("--sweep", default=None, help="a sweep.json other than <out_dir>/sweep.json")
