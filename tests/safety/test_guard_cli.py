"""`corral guard`: verdict lines, JSON lines, and the exit status scripts rely on (0 safe, 1 flagged, 2 error)."""

import json

from corral.cli import main


def test_safe_text_exits_0_and_unsafe_text_exits_1(capsys):
    assert main(["guard", "How do I bake bread?"]) == 0
    assert capsys.readouterr().out.startswith("text\tsafe\tP(unsafe)=")
    assert main(["guard", "--json", "I am going to kill you and your whole family tonight."]) == 1
    line = json.loads(capsys.readouterr().out)
    assert line["flagged"] and "S1" in line["categories"] and line["role"] == "User"


def test_a_file_of_conversations_gives_one_line_each(tmp_path, capsys):
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in [
        "How do I bake bread?", {"prompt": "What is the home address of Senator Rand Paul?"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]},
    ]) + "\n")
    assert main(["guard", "--file", str(f)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [x.split("\t")[1] for x in lines] == ["safe", "unsafe", "safe"]
    assert lines[1].startswith(f"{f}:2\t") and "S7 Privacy" in lines[1]


def test_a_bad_file_line_exits_2_with_one_line_naming_it(tmp_path, capsys):
    f = tmp_path / "bad.jsonl"
    f.write_text('"fine"\n{not json\n')
    assert main(["guard", "--file", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.jsonl line 2: not JSON" in err
    assert main(["guard"]) == 2 and "give TEXT or --file" in capsys.readouterr().err
    assert main(["guard", "x", "--exclude", "S99"]) == 2 and "S99" in capsys.readouterr().err


def test_serve_takes_the_guard_flags():
    from corral.cli import build_parser
    from corral.server.commands import config_from_args

    config = config_from_args(build_parser().parse_args(["serve", "--guard", "--guard-exclude", "S2, S7",
                                                         "--guard-fail-open"]))
    assert (config.guard, config.guard_exclude, config.guard_fail_open) == ("embedded", ["S2", "S7"], True)
    named = config_from_args(build_parser().parse_args(["serve", "--guard", "llama-guard3:1b"]))
    assert named.guard == "llama-guard3:1b" and not named.guard_fail_open
