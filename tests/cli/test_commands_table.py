"""cli.COMMANDS is the whole registry, and `corral chat` runs the same loop as `corral run`."""

import argparse
import io

from corral.cli import COMMANDS, GROUPS, build_parser, main


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_subcommand_the_parser_knows_is_a_row_of_commands_with_its_handler():
    parsers = {}
    for name, parser in _subcommands(build_parser()).items():
        if name in GROUPS:
            parsers |= {f"{name} {step}": sub for step, sub in _subcommands(parser).items()}
        else:
            parsers[name] = parser
    aliases = {alias: name for name, c in COMMANDS.items() for alias in c.aliases}
    assert set(parsers) - set(aliases) == set(COMMANDS) and len(COMMANDS) >= 22  # the first half had 22
    for name, parser in parsers.items():
        assert parser.get_default("handler") is COMMANDS[aliases.get(name, name)].handler, name
    assert build_parser().parse_args(["scaling", "fit", "c.toml"]).handler is COMMANDS["scaling fit"].handler
    assert build_parser().parse_args(["serve", "--debug"]).debug is True


def test_corral_chat_is_the_repl_with_flags_as_parameters_and_saves_the_file(home, models, monkeypatch, capsys):
    """`corral chat FILE`: answers, /set, /show parameters and /save work as in `corral run`."""
    lines = "hello\n/set parameter temperature 0\n/show parameters\n/save kept\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert main(["chat", str(models["meta"]), "--max-tokens", "4", "--top-k", "5"]) == 0
    out = capsys.readouterr().out
    assert "num_predict     4" in out and "top_k           5" in out and "temperature     0" in out
    assert "Created new model 'kept'" in out
    assert main(["show", "kept", "--parameters"]) == 0
    shown = capsys.readouterr().out
    assert "num_predict" in shown and "top_k" in shown
