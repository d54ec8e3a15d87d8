"""The curation config: input, output and the pipeline as a readable list of steps, typed and strict.

    [input]
    paths = ["data/web/messy_mix.jsonl"]     # files, or directories of them: each file is one task

    [output]
    dir = "curated"

    [[steps]]
    kind = "language"                        # a key of STEPS; the other keys are that step's config
    languages = ["en"]

    [[steps]]
    kind = "minhash_dedup"

STEPS is the whole registry. A step's unknown key is a ConfigError naming ``steps[i].key``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from corral.config import from_dict, load_toml_config
from corral.data import blocklists, decontaminate, dedup, language, quality
from corral.data.documents import Step
from corral.data.inputs import Reader
from corral.errors import ConfigError


@dataclass
class InputConfig:
    paths: list[str] = field(default_factory=list)
    """Input files or directories (every file in them, sorted); each file is one task and one output shard."""
    strict: bool = False
    """Raise on the first bad record instead of skipping and counting it."""
    text_key: str = "text"
    id_key: str = "id"
    max_record_bytes: int = 10_000_000
    max_html_bytes: int = 5_000_000
    max_html_depth: int = 512


@dataclass
class OutputConfig:
    dir: str = ""
    """Output directory: shards/, exclusions/, report.json, report.md, report.png (and work/ while running)."""
    exclusions: bool = True
    """Keep every dropped document with its step and reason in exclusions/."""


@dataclass
class CurateConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    steps: list[dict] = field(default_factory=list)
    """The pipeline, in order: tables with a ``kind`` (a key of STEPS) and that step's settings."""


@dataclass
class DedupStepConfig:
    """Exact dedup has no settings; MinHash's are dedup.MinHashConfig."""


class GlobalDedup:
    """A barrier step: per-document signatures in the shard tasks, one ordered resolve over all of them."""

    def __init__(self, name: str, signature: Callable[[str], np.ndarray], bands: int):
        self.name, self.signature, self.bands = name, signature, bands

    def resolve(self, signatures: np.ndarray) -> list[int]:
        return dedup.resolve(signatures, self.bands)


def _exact(_: DedupStepConfig) -> GlobalDedup:
    return GlobalDedup("exact_dedup", dedup.exact_signature, 1)


def _minhash(c: dedup.MinHashConfig) -> GlobalDedup:
    return GlobalDedup("minhash_dedup", dedup.MinHasher(c).signature, c.bands)


# kind -> (config dataclass, builder). Builders return a Step (runs inside a shard task) or a
# GlobalDedup (a barrier between shard tasks).
STEPS: dict[str, tuple[type, Callable[[Any], Step | GlobalDedup]]] = {
    "language": (language.LanguageConfig, language.LanguageFilter),
    "gopher_quality": (quality.GopherQualityConfig, quality.GopherQuality),
    "gopher_repetition": (quality.GopherRepetitionConfig, quality.GopherRepetition),
    "c4": (quality.C4Config, quality.C4),
    "fineweb": (quality.FineWebConfig, quality.FineWeb),
    "url_filter": (blocklists.UrlFilterConfig, blocklists.UrlFilter),
    "bad_words": (blocklists.BadWordsConfig, blocklists.BadWords),
    "pii": (blocklists.PiiConfig, blocklists.PiiMask),
    "line_dedup": (dedup.LineDedupConfig, dedup.LineDedup),
    "decontaminate": (decontaminate.DecontaminateConfig, decontaminate.Decontaminate),
    "exact_dedup": (DedupStepConfig, _exact),
    "minhash_dedup": (dedup.MinHashConfig, _minhash),
}


def step_config(spec: dict, index: int) -> tuple[str, Any]:
    """(kind, typed config) of one ``[[steps]]`` table."""
    where = f"steps[{index}]"
    spec = copy.deepcopy(spec)
    kind = spec.pop("kind", None)
    if kind not in STEPS:
        raise ConfigError(f"{where}.kind must be one of {', '.join(STEPS)}; got {kind!r}")
    return kind, from_dict(STEPS[kind][0], spec, where, what="curate config")


def build_step(spec: dict, index: int) -> Step | GlobalDedup:
    kind, config = step_config(spec, index)
    step = STEPS[kind][1](config)
    step.name = step_key(index, kind)
    return step


def step_key(index: int, kind: str) -> str:
    """The name a step's stats and exclusions go under: its position and kind ("02_c4")."""
    return f"{index:02d}_{kind}"


def load_config(path: str | Path | None, overrides: list[str] = ()) -> CurateConfig:
    config = load_toml_config(CurateConfig, path, overrides, what="curate config")
    if not config.input.paths:
        raise ConfigError("input.paths must name at least one input file or directory")
    if not config.output.dir:
        raise ConfigError("output.dir must be set")
    for i, spec in enumerate(config.steps):
        step_config(spec, i)  # every step checked before any work starts
    return config


def make_reader(c: InputConfig) -> Reader:
    return Reader(text_key=c.text_key, id_key=c.id_key, strict=c.strict, max_record_bytes=c.max_record_bytes,
                  max_html_bytes=c.max_html_bytes, max_html_depth=c.max_html_depth)


def stages(config: CurateConfig) -> list[tuple[list[int], int | None]]:
    """The steps cut at every barrier: [(indices of shard-local steps, index of the barrier or None)]."""
    out: list[tuple[list[int], int | None]] = []
    local: list[int] = []
    for i, spec in enumerate(config.steps):
        if STEPS[spec["kind"]][1] in (_exact, _minhash):
            out.append((local, i))
            local = []
        else:
            local.append(i)
    out.append((local, None))
    return out
