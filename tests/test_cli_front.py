"""The command line as a new user meets it: help, version, and mistakes found before any model loads."""

import time

import pytest

from hf_geocomp.cli import build_parser, main


def run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr()


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "hf-geocomp 0.1.0" in capsys.readouterr().out
    parser = build_parser()
    for name, sub in parser.subcommands.items():
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, []) and action.dest != "help":
                flat, expected = "".join(text.split()), "".join(f"(default: {action.default}".split())
                assert "default" in (action.help or "") or expected in flat, \
                    (name, action.dest)


def test_a_command_line_loads_only_its_command():
    """``hf-geocomp --help`` lists each subcommand's summary read from its source (no import): the same text as its
    options' docstring; a command line's parser has that command's options alone, the same as the whole parser's."""
    from hf_geocomp.cli import command_table
    from hf_geocomp.options import summary

    whole, listed = build_parser(), build_parser(["--help"])
    helps = {c.dest: c.help for a in listed._actions for c in getattr(a, "_choices_actions", ())}
    for name, command in command_table().items():
        assert command.summary() == summary(command.load()[0]) == helps[name], name
        assert not [a for a in listed.subcommands[name]._actions if a.dest != "help"], name
        one = build_parser([name, "--help"]).subcommands[name]
        assert one.format_help() == whole.subcommands[name].format_help(), name


def test_prune_help_lists_every_criterion():
    from hf_geocomp.prune.scorers import SCORERS

    text = build_parser().subcommands["prune"].format_help()
    for name in SCORERS:
        assert name in text, name


@pytest.mark.parametrize("argv, message", [
    (["bench-kv", "--quant", "foo:4", "-o", "{tmp}/kv.json"], "QuantizedCache baseline 'foo:4' is not one of"),
    (["bench-kv", "--quant", "quanto:3", "-o", "{tmp}/kv.json"], "QuantizedCache baseline 'quanto:3'"),
    (["bench-kv", "--refine-lr", "0.01", "fastrel", "-o", "{tmp}/kv.json"], "refine_lr 'fastrel' is not a positive"),
    (["analyze", "--model", "smollm2-13m", "-o", "{tmp}/a"], "did you mean 'smollm2-135m'?"),
    (["analyze", "--model", "nobody/no-such-model", "-o", "{tmp}/a"], "HF_HUB_OFFLINE is set"),
    (["bench-prune", "-o", "{tmp}/exists.json"], "output file '{tmp}/exists.json' already exists; pass --overwrite"),
    (["analyze", "-o", "{tmp}/full"], "output folder '{tmp}/full' already exists and is not empty; pass --overwrite"),
])
def test_mistakes_exit_2_with_one_sentence_before_loading(argv, message, tmp_path, capsys):
    (tmp_path / "exists.json").write_text("{}")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "report.json").write_text("{}")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    t0 = time.perf_counter()
    code, out = run(argv, capsys)
    assert code == 2 and message.replace("{tmp}", str(tmp_path)) in out.err and "Traceback" not in out.err
    assert len(out.err.strip().splitlines()) == 1
    assert time.perf_counter() - t0 < 10  # no model was loaded
    assert not (tmp_path / "kv.json").exists() and not (tmp_path / "a").exists()


def test_batch_size_zero_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--batch-size", "0"])
    assert e.value.code == 2 and "--batch-size: 0 must be at least 1" in capsys.readouterr().err


def test_a_recipe_cannot_overwrite_by_itself(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("command: analyze\noutput: out\noverwrite: true\n")
    code, out = run(["run", str(recipe)], capsys)
    assert code == 2 and "never replaces existing results by itself" in out.err


def test_committed_recipes_do_not_overwrite(capsys):
    import pathlib

    import yaml

    for path in pathlib.Path(__file__).parents[1].glob("recipes/*.yaml"):
        assert "overwrite" not in (yaml.safe_load(path.read_text()) or {}), path
