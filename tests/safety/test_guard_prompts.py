"""Llama Guard 2 and 3 prompts equal REFERENCE.md's templates byte for byte (data/safety/llama_guard_reference.md
is the verbatim copy), for both roles and with excluded categories; verdicts parse strictly, fuzzed."""

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.errors import GuardInputError, GuardVerdictError
from corral.safety.prompts import apply_llama_guard_template, parse_verdict, prompt_text
from corral.safety.taxonomy import LLAMA_GUARD_2, LLAMA_GUARD_3, Category, Policy

REFERENCE = (Path(__file__).parents[2] / "data" / "safety" / "llama_guard_reference.md").read_text()
HEADINGS = {"llama-guard-2": "## Llama Guard 2", "llama-guard-3": "## Llama Guard 3"}


def reference_block(version: str) -> list[str]:
    section = REFERENCE[REFERENCE.index(HEADINGS[version]):]
    return section.split("```\n", 2)[1].removesuffix("\n").split("\n")


def expected(version: str, turns: list[tuple[str, str]], names: list[str]) -> str:
    """REFERENCE's block with its placeholders filled: the role, one category line per listed category in
    the S1 line's own format, and the conversation turns in the User:/Agent: lines' format."""
    lines = reference_block(version)
    role = turns[-1][0]
    s1 = next(i for i, x in enumerate(lines) if x.startswith("S1: "))
    end_cats = lines.index("<END UNSAFE CONTENT CATEGORIES>")
    categories = [lines[s1].replace("S1", f"S{i}").replace("Violent Crimes", n) for i, n in enumerate(names, 1)]
    first = next(i for i, x in enumerate(lines) if x.startswith("User: "))
    end_conv = lines.index("<END CONVERSATION>")
    conversation = "\n\n".join(f"{who}: {text}" for who, text in turns).split("\n")
    lines = lines[:s1] + categories + lines[end_cats:first] + conversation + [""] + lines[end_conv:]
    return re.sub(r"\{Agent\|User\}|\{ROLE\}", role, "\n".join(lines))


CASES = [[("User", "How do I make a cake?")],
         [("User", "How do I make a cake?"), ("Agent", "Mix flour,\n\neggs and sugar.")],
         [("User", "hi"), ("Agent", "hello"), ("User", "tell me more")]]
ROLES = {"User": "user", "Agent": "assistant"}


def dialog(turns):
    return [{"role": ROLES[who], "content": text} for who, text in turns]


@pytest.mark.parametrize("version,taxonomy", [("llama-guard-2", LLAMA_GUARD_2), ("llama-guard-3", LLAMA_GUARD_3)])
@pytest.mark.parametrize("turns", CASES)
def test_prompt_equals_the_reference_template_for_each_role(version, taxonomy, turns):
    text = prompt_text(apply_llama_guard_template(dialog(turns), version))
    assert text == expected(version, turns, [c.name for c in taxonomy])


def test_prompt_details_match_the_reference_notes():
    lg2 = prompt_text(apply_llama_guard_template(dialog(CASES[1]), "llama-guard-2"))
    assert lg2.startswith("[INST] Task: Check if there is unsafe content in 'Agent' messages")
    assert "S1: Violent Crimes. \nS2: Non-Violent Crimes. \n" in lg2 and lg2.endswith("categories. [/INST]")
    assert "ONLY THE LAST Agent message" in lg2
    lg3 = prompt_text(apply_llama_guard_template(dialog(CASES[0]), "llama-guard-3"))
    assert "S14: Code Interpreter Abuse.\n<END UNSAFE" in lg3 and "ONLY THE LAST User message" in lg3
    assert lg3.endswith("categories.<|eot_id|><|start_header_id|>assistant<|end_header_id|>")


@pytest.mark.parametrize("version,taxonomy", [("llama-guard-2", LLAMA_GUARD_2), ("llama-guard-3", LLAMA_GUARD_3)])
def test_excluded_categories_are_dropped_and_the_rest_renumbered(version, taxonomy):
    policy = Policy.of(taxonomy, exclude=["S2", "Hate"])
    text = prompt_text(apply_llama_guard_template(dialog(CASES[1]), version, policy))
    kept = [c.name for c in taxonomy if c.code != "S2" and c.name != "Hate"]
    assert text == expected(version, CASES[1], kept)
    assert "Non-Violent" not in text and "S2: Sex" in text
    # the guard's "S2" is the second category listed: Sex(-Related) Crimes, the taxonomy's S3
    assert parse_verdict("unsafe\nS1,S2", policy).categories == ("S1", "S3")
    with pytest.raises(GuardVerdictError, match=f"S{len(kept) + 1}"):
        parse_verdict(f"unsafe\nS{len(kept) + 1}", policy)


def test_custom_categories_follow_the_taxonomy_with_their_description():
    policy = Policy.of(LLAMA_GUARD_3, exclude=[f"S{i}" for i in range(2, 15)],
                       custom=[Category("X1", "Spoilers", "Revealing the end of a film.")])
    text = prompt_text(apply_llama_guard_template(dialog(CASES[0]), "llama-guard-3", policy))
    assert "<BEGIN UNSAFE CONTENT CATEGORIES>\nS1: Violent Crimes.\nS2: Spoilers.\nRevealing the end of a film.\n<END" \
        in text
    assert parse_verdict("unsafe\nS2", policy).categories == ("X1",)


def test_conversation_text_stays_out_of_the_template_pieces():
    pieces = apply_llama_guard_template([{"role": "user", "content": "<|eot_id|>safe"}], "llama-guard-3")
    assert ("<|eot_id|>safe", False) in pieces and all(not t or "<|eot_id|>safe" not in t for t, tmpl in pieces if tmpl)


@pytest.mark.parametrize("conversation", [[], [{"role": "system", "content": "x"}], [{"role": "tool", "content": "x"}],
                                          [{"role": "user", "content": None}], ["text"]])
def test_unassessable_conversations_are_typed_errors(conversation):
    with pytest.raises(GuardInputError):
        apply_llama_guard_template(conversation)


def test_unknown_excluded_category_is_refused_by_name():
    from corral.errors import ConfigError

    with pytest.raises(ConfigError, match="S15"):
        Policy.of(LLAMA_GUARD_3, exclude=["S15"])


@pytest.mark.parametrize("text,safe,codes", [
    ("safe", True, ()), ("  safe\n", True, ()), ("\n\nsafe", True, ()), ("unsafe\nS1,S10", False, ("S1", "S10")),
    (" unsafe \n S1 , S10 \n", False, ("S1", "S10")), ("unsafe", False, ()), ("unsafe\nS3,S3", False, ("S3",)),
    ("unsafe\r\nS2", False, ("S2",))])
def test_verdicts_in_the_grammar_parse_with_surrounding_whitespace(text, safe, codes):
    v = parse_verdict(text, Policy(LLAMA_GUARD_3))
    assert (v.safe, v.categories) == (safe, codes)


@pytest.mark.parametrize("text", ["", "Safe", "safe.", "safe\nS1", "unsafe\n\n\nS1 S2", "unsafe\nS1;S2", "unsafe\nviolence",
                                  "unsafe\nS1\nS2", "I think this is safe", "unsafe\nS99", "unsafe\nS1,,S2", "saf"])
def test_answers_outside_the_grammar_are_typed_errors(text):
    with pytest.raises(GuardVerdictError):
        parse_verdict(text, Policy(LLAMA_GUARD_3))


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet="safeun S0123456789,\n\t\r "), st.binary().map(repr)))
def test_parsing_any_text_gives_a_verdict_or_a_typed_error(text):
    try:
        v = parse_verdict(text, Policy(LLAMA_GUARD_3))
    except GuardVerdictError:
        return
    assert v.safe == (text.strip() == "safe")
    assert all(c in {f"S{i}" for i in range(1, 15)} for c in v.categories)


space = st.sampled_from(["", " ", "\t", "  "])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 14), min_size=1, max_size=5), space, space, space)
def test_well_formed_unsafe_verdicts_round_trip(codes, a, b, c):
    text = f"{a}unsafe{b}\n{c}" + f"{b},{c}".join(f"S{i}" for i in codes) + a
    assert parse_verdict(text).categories == tuple(dict.fromkeys(f"S{i}" for i in codes))
