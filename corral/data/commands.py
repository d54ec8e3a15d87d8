"""``corral curate``: argparse wiring only; the work happens in corral.data.executor."""

from __future__ import annotations

import argparse
import json


def curate_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Any config field can be overridden after the config: --output.dir=out --input.strict=true. "
                "A rerun with the same output.dir skips every shard that finished (completion markers).")
    p.add_argument("config", help="TOML config: [input] paths, [output] dir, and the pipeline as [[steps]] tables "
                                  "(docs/curation.md lists every step kind and its settings)")
    _flags(p)
    p.add_argument("overrides", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def _flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: this machine's processes; ray: a Ray cluster (default: local)")
    p.add_argument("--workers", type=int, default=1, help="shard tasks at once (default: 1)")
    p.add_argument("--address", default=None,
                   help="with --executor ray: an existing cluster ('auto', 'ray://host:10001'); default: start "
                        "a local one with --workers CPUs")


def cmd_curate(args: argparse.Namespace, embed=None) -> int:
    """Curate input shards as the config says; a rerun redoes only the shards that did not finish.

    ``embed`` (texts -> unit vectors) serves semantic_dedup; corral.cli passes all-MiniLM-L6-v2's.
    """
    from corral.data.executor import curate, run_local
    from corral.data.pipeline import load_config
    from corral.errors import ConfigError

    flags = argparse.ArgumentParser(add_help=False)
    _flags(flags)
    args, overrides = flags.parse_known_args(args.overrides, namespace=args)  # flags after the overrides
    config = load_config(args.config, overrides)
    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    if args.executor == "ray":
        from corral.data.ray_executor import ray_runner

        with ray_runner(args.workers, args.address) as runner:
            report = curate(config, runner, embed)
    else:
        report = curate(config, run_local(args.workers), embed)
    steps = report["steps"]
    print(json.dumps({"output": config.output.dir, "shards": report["shards"],
                      "kept": {name: s["kept"] for name, s in steps.items()}}))
    return 0


def mix_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Train on the result with: corral pretrain CONFIG --data.train='[\"OUT/train\"]' "
                "--data.val='[\"OUT/val/NAME.bin\"]'")
    p.add_argument("config", help="TOML: out_dir, val_fraction, and [[sources]] tables (name, paths, weight)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def cmd_mix(args: argparse.Namespace) -> int:
    """Weight curated sources (up/down-sample) and write them as pretraining token shards."""
    from corral.data.mix import load_mix_config, write_mix

    manifest = write_mix(load_mix_config(args.config, list(args.overrides)))
    print(json.dumps(manifest["sources"]))
    return 0
