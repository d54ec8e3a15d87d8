"""The embedded guard's labelled examples, mapped to Llama Guard 3's S1..S14, and its fixed split.

Sources (data/safety/README.md has their licences):
  mod    OpenAI's moderation samples (moderation_train.jsonl): unsafe when any of its labels is 1;
         S/S3 -> S12 (S3 also S4), H/H2 -> S10, V/V2 -> S1, SH -> S11; HR (harassment) flags with no code.
  hh     first human turns of Anthropic's HH red-team dialogues that match a HH_RULES pattern: unsafe, with
         the rule's categories (weak labels; a turn matching no rule is left out, many are harmless openers).
  dpo    first human turns of LLaMA-Factory's DPO demo set: benign, all categories 0.
  frr    CyberSecEval's MITRE false-refusal prompts: benign cyber-security requests, all categories 0.
  look   benign look-alikes written for this guard (guard_lookalikes.txt: "kill a Python process").
A category label is 1, 0 or None (unknown: that category's loss skips the example).
"""

from __future__ import annotations

import gzip
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from corral.safety.taxonomy import LLAMA_GUARD_3

CODES = [c.code for c in LLAMA_GUARD_3]
REPO_DATA = Path(__file__).parents[2] / "data" / "safety"
HELD_OUT_FRACTION = 0.25
SPLIT_SEED = 17

# moderation label -> Llama Guard 3 codes (safety/README.md's mapping, moved from Llama Guard 2 numbers)
MODERATION_MAP = {"S": ["S12"], "S3": ["S12", "S4"], "H": ["S10"], "H2": ["S10"], "V": ["S1"], "V2": ["S1"],
                  "SH": ["S11"], "HR": []}

# pattern over a lower-cased HH human turn -> the Llama Guard 3 codes it marks
HH_RULES = {
    r"\b(kill|murder|stab|strangle|beat (him|her|them|someone) up|hurt (him|her|someone|my)|torture|kidnap)":
        ["S1"],
    r"\b(poison|assault|attack (him|her|someone|people))": ["S1"],
    r"\b(steal|rob\b|robb|shoplift|burglar|break into|pick a lock|hotwire|scam|fraud|counterfeit|launder|embezzl"
    r"|smuggl|fake id|forge|cheat on my taxes|get away with|sell drugs|make meth|cocaine|heroin|meth\b)": ["S2"],
    r"\b(hack into|hacking into|steal (a|their) password)": ["S2", "S14"],
    r"\b(rape|take advantage of my date|roofie|sex traffick|prostitut)": ["S3"],
    r"\b(child porn|underage girl|underage boy)": ["S4"],
    r"\b(tarnish|ruin (his|her|their|someone'?s) reputation|spread (a )?rumou?r|defam)": ["S5"],
    r"\b(home address|residential address|phone number|social security number|email address (of|for)|where does .* live)": ["S7"],
    r"\b(pirate|torrent|download .* for free|bootleg)": ["S8"],
    r"\b(bomb|explosive|nerve gas|anthrax|bioweapon|chemical weapon|dirty bomb|nuclear weapon)": ["S9"],
    r"\b(racist|slur|n-word|insults? for|hate (black|jew|muslim|gay|mexican|asian|white)|inferior race"
    r"|keep (mexicans|blacks|jews|muslims))": ["S10"],
    r"\b(kill myself|suicide|cut myself|end my life|self[- ]harm)": ["S11"],
    r"\b(porn|have sex|naked|nude|sexual|orgasm|blowjob|fetish)": ["S12"],
    r"\b(rig (the|an) election|voter fraud|stuff ballot)": ["S13"],
}
_COMPILED = [(re.compile(p), codes) for p, codes in HH_RULES.items()]


@dataclass
class Example:
    id: str
    text: str
    unsafe: int
    labels: dict
    """code -> 1 / 0 / None (unknown)"""


def benign(id: str, text: str) -> Example:
    return Example(id, text, 0, dict.fromkeys(CODES, 0))


def moderation(path: Path) -> list[Example]:
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        row = json.loads(line)
        given = {k: v for k, v in row.items() if k in MODERATION_MAP}
        unsafe = int(any(v == 1 for v in given.values()))
        labels = dict.fromkeys(CODES, 0 if not unsafe else None)
        for code in CODES:  # a mapped code is known when any label mapping to it is present
            sources = [k for k, codes in MODERATION_MAP.items() if code in codes and k in given]
            if sources:
                labels[code] = int(any(given[k] == 1 for k in sources))
        out.append(Example(f"mod:{i}", row["prompt"], unsafe, labels))
    return out


def hh_turns(path: Path) -> list[Example]:
    out, seen = [], set()
    with gzip.open(path, "rt") as f:
        for i, line in enumerate(f):
            turn = json.loads(line)["chosen"].split("\n\nHuman: ", 1)[1].split("\n\nAssistant:", 1)[0].strip()
            codes = sorted({c for rx, cs in _COMPILED if rx.search(turn.lower()) for c in cs})
            if not codes or turn in seen:
                continue
            seen.add(turn)
            out.append(Example(f"hh:{i}", turn, 1, {c: 1 if c in codes else None for c in CODES}))
    return out


def benign_sets(shared: Path) -> list[Example]:
    dpo = json.loads((shared / "preference" / "dpo_en_demo.json").read_text())
    frr = json.loads((shared / "safety" / "mitre_frr_benign_dev.json").read_text())
    looks = [t for t in (REPO_DATA / "guard_lookalikes.txt").read_text().splitlines() if t.strip()]
    # half of each benign set: embedding time on 2 cores is the budget (~15 min for the whole set)
    return ([benign(f"dpo:{i}", r["conversations"][-1]["value"]) for i, r in enumerate(dpo[:150])]
            + [benign(f"frr:{i}", r["mutated_prompt"]) for i, r in enumerate(frr[:75])]
            + [benign(f"look:{i}", t) for i, t in enumerate(looks)])


def all_examples(shared: Path) -> list[Example]:
    return (moderation(shared / "safety" / "moderation_train.jsonl")
            + hh_turns(shared / "preference" / "hh_rlhf_harmless_base_test.jsonl.gz") + benign_sets(shared))


def split(examples: list[Example], seed: int = SPLIT_SEED) -> set[str]:
    """Held-out ids: HELD_OUT_FRACTION of each source, drawn with a fixed seed."""
    held = set()
    by_source: dict[str, list[str]] = {}
    for e in examples:
        by_source.setdefault(e.id.split(":")[0], []).append(e.id)
    for source in sorted(by_source):
        ids = sorted(by_source[source])
        random.Random(f"{seed}:{source}").shuffle(ids)
        held.update(ids[:round(len(ids) * HELD_OUT_FRACTION)])
    return held


def role_of(example_id: str) -> str:
    """User or Agent, fixed per example: the head learns the role line carries no verdict."""
    return "User" if random.Random(f"role:{example_id}").random() < 0.5 else "Agent"
