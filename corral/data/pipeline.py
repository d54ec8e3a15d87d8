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
from corral.data import blocklists, decontaminate, dedup, language, quality, quality_classifier, semdedup
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
    """A barrier step: signatures in the shard tasks (``signatures(texts) -> (N, k)``), then one resolve
    over all shards' signatures in order (``resolve(signatures) -> index duplicated or -1, per row``)."""

    def __init__(self, name: str, signatures: Callable[[list[str]], np.ndarray],
                 resolve: Callable[[np.ndarray], list[int]]):
        self.name, self.signatures, self.resolve = name, signatures, resolve


def _per_doc(signature: Callable[[str], np.ndarray]) -> Callable[[list[str]], np.ndarray]:
    return lambda texts: np.stack([signature(t) for t in texts])


def _exact(_: DedupStepConfig, embed: semdedup.Embed | None) -> GlobalDedup:
    return GlobalDedup("exact_dedup", _per_doc(dedup.exact_signature), lambda sigs: dedup.resolve(sigs, 1))


def _minhash(c: dedup.MinHashConfig, embed: semdedup.Embed | None) -> GlobalDedup:
    return GlobalDedup("minhash_dedup", _per_doc(dedup.MinHasher(c).signature),
                       lambda sigs: dedup.resolve(sigs, c.bands))


def _semantic(c: semdedup.SemDedupConfig, embed: semdedup.Embed | None) -> GlobalDedup:
    if embed is None:
        raise ConfigError("semantic_dedup needs an embedding model; `corral curate` passes all-MiniLM-L6-v2")
    return GlobalDedup("semantic_dedup", embed, lambda sigs: semdedup.semdedup(sigs, c))


NEEDS_EMBED = {"quality_classifier"}  # shard-local steps built with the embedding function
BARRIERS = {"exact_dedup": _exact, "minhash_dedup": _minhash, "semantic_dedup": _semantic}


# kind -> (config dataclass, builder). Builders return a Step (runs inside a shard task) or, for the
# kinds in BARRIERS, a GlobalDedup (a barrier between shard tasks; built with the embedding function).
STEPS: dict[str, tuple[type, Callable[..., Step | GlobalDedup]]] = {
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
    "quality_classifier": (quality_classifier.QualityConfig, quality_classifier.QualityFilter),
    "exact_dedup": (DedupStepConfig, _exact),
    "minhash_dedup": (dedup.MinHashConfig, _minhash),
    "semantic_dedup": (semdedup.SemDedupConfig, _semantic),
}


def step_config(spec: dict, index: int) -> tuple[str, Any]:
    """(kind, typed config) of one ``[[steps]]`` table."""
    where = f"steps[{index}]"
    spec = copy.deepcopy(spec)
    kind = spec.pop("kind", None)
    if kind not in STEPS:
        raise ConfigError(f"{where}.kind must be one of {', '.join(STEPS)}; got {kind!r}")
    return kind, from_dict(STEPS[kind][0], spec, where, what="curate config")


def build_step(spec: dict, index: int, embed: semdedup.Embed | None = None) -> Step | GlobalDedup:
    kind, config = step_config(spec, index)
    if kind in BARRIERS or kind in NEEDS_EMBED:
        step = (BARRIERS.get(kind) or STEPS[kind][1])(config, embed)
    else:
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
        if spec["kind"] in BARRIERS:
            out.append((local, i))
            local = []
        else:
            local.append(i)
    out.append((local, None))
    return out
