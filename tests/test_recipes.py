"""Recipes and committed commands: every recipe and every committed result's command still parse into the options
dataclass of its command; recipe mistakes name the key and the file; the resolved recipe reruns the study."""

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from hf_geocomp.cli import commands, main, parse_options
from hf_geocomp.io import resolved_args
from hf_geocomp.options import default_of
from hf_geocomp.recipes import build, load_job, recipe_text, to_yaml_dict, type_name

ROOT = Path(__file__).parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
RESULTS = sorted(p for p in (ROOT / "recipes" / "results").rglob("*.json")
                 if str(json.loads(p.read_text()).get("command", "")).startswith("hf-geocomp "))


def _options(path: Path):
    return parse_options(["run", str(path)])


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses_and_its_keys_are_the_fields(path, tmp_path):
    keys = set(yaml.safe_load(path.read_text())) - {"command"}
    options = _options(path)
    resolved = to_yaml_dict(options)
    assert keys <= set(resolved)
    if "command" not in yaml.safe_load(path.read_text()):  # the job: load_job is the recipe path too
        assert to_yaml_dict(load_job(str(path))) == resolved
        return
    assert set(resolved) == set(resolved_args(options)) - {"command"}
    # the resolved recipe saved beside results is itself a recipe that gives the same options
    again = tmp_path / "again.yaml"
    again.write_text(recipe_text(options))
    assert _options(again) == options and _options(again).command == options.command


def _comments(text: str) -> dict[str, str]:
    """key (``section.key`` inside a section) → its comment, continuation lines (comment only) joined."""
    out, section, last = {}, None, None
    for line in text.splitlines():
        m = re.match(r"^(\s*)([a-z_]+):[^#]*?(?:\s#\s*(.*))?$", line)
        if m:
            indent, key, comment = m.groups()
            section = key if not indent else section
            last = key if not indent else f"{section}.{key}"
            out[last] = (comment or "").strip()
        elif re.match(r"^\s+#", line) and last:
            out[last] += " " + line.strip().lstrip("#").strip()
        else:
            last = None
    return out


def _states_default(comment: str, default) -> bool:
    """Whether ``comment`` says ``(default X)`` (or ``(default X: why)``) with X, read as YAML, equal to ``default``."""
    m = re.search(r"\(default (.*?)\)(?:$|[;,. ])", comment)
    return bool(m) and any(yaml.safe_load(text) == default for text in (m[1], m[1].split(": ")[0]))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_key_is_commented_with_its_type_and_default(path):
    import dataclasses
    import typing

    from hf_geocomp.job import DEFAULT_KV, DEFAULT_PRUNE, JobConfig
    from hf_geocomp.kv.config import KVConfig
    from hf_geocomp.prune import PruneConfig

    recipe = yaml.safe_load(path.read_text())
    cls = commands()[recipe["command"]][0] if "command" in recipe else JobConfig
    sections = {"prune": (PruneConfig, DEFAULT_PRUNE), "kv": (KVConfig, DEFAULT_KV)} if cls is JobConfig else {}
    for key, comment in _comments(path.read_text()).items():
        assert comment, f"{path.name}: key {key!r} has no comment"
        if key == "command":
            continue
        if key in sections:  # a section names the dataclass its keys are fields of
            assert sections[key][0].__name__ in comment, (path.name, key)
            continue
        section, _, name = key.rpartition(".")
        owner, defaults = sections[section] if section else (cls, {})
        default = defaults.get(name, default_of(owner.__dataclass_fields__[name]))
        default = list(default) if isinstance(default, tuple) else default
        assert comment.startswith(type_name(typing.get_type_hints(owner)[name])), (path.name, key, comment)
        if default is dataclasses.MISSING:
            assert "(required)" in comment, (path.name, key, comment)
        else:
            assert _states_default(comment, default), (path.name, key, default, comment)


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: str(p.relative_to(ROOT / "recipes" / "results")))
def test_every_committed_command_still_parses(path, monkeypatch):
    """A result's ``command`` still parses into its options (a ``run`` of a recipe through the recipe); where the
    result also recorded its resolved options, the command resolves to exactly those today."""
    monkeypatch.chdir(ROOT)  # the commands name their recipes relative to the repository
    result = json.loads(path.read_text())
    options = parse_options(shlex.split(result["command"])[1:])
    saved = result.get("args") or result.get("options")
    if isinstance(saved, dict):
        cls = commands()[saved["command"]][0]
        resolved = resolved_args(options)
        newer = {k for k in resolved if k not in saved}  # options added after the result: at their defaults
        assert all(resolved[k] == default_of(cls.__dataclass_fields__[k]) for k in newer), newer
        assert {k: v for k, v in resolved.items() if k not in newer} == {k: v for k, v in saved.items()
                                                                         if k != "overwrite"}
        assert build(cls, {k: v for k, v in saved.items() if k not in ("command", "overwrite")}, str(path)) == options


def test_every_study_has_a_recipe_path_and_a_flag_per_field():
    import dataclasses

    from hf_geocomp.cli import build_parser

    parser = build_parser()
    for name, (cls, run) in commands().items():
        dests = {a.dest for a in parser.subcommands[name]._actions} - {"help", "overwrite"}
        assert dests == {f.name for f in dataclasses.fields(cls) if f.init}, name
        assert callable(run) and cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("), name


@pytest.mark.parametrize("body, message", [
    ("command: bench-fold\nseedz: 3\n", "unknown key 'seedz'; allowed: model, data, tokens"),
    ("command: bench-fold\nseeds: many\n", "key 'seeds' must be int, got 'many'"),
    ("command: bench-fold\nsparsities: 0.2\n", "key 'sparsities' must be list[float], got 0.2"),
    ("command: bench-fold\nseeds: 0\n", "seeds must be at least 1, got 0"),
    ("command: bench-fold\nsparsities: [0.2, 1.5]\n", "sparsities must be in [0, 1), got [0.2, 1.5]"),
    ("command: bench-h3\ncontrols: [plain, whiten]\n", "controls 'whiten' does not exist; allowed: plain, removed"),
    ("command: bench-kv-kernel\n", "key 'widths' is required"),
    ("command: bench-fold\nmethods: []\n", "methods must name at least one value"),
])
def test_study_recipe_mistakes_name_the_key_and_the_file(body, message, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(body)
    assert main(["run", str(recipe), "-o", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(recipe) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out.json").exists()


def test_set_and_output_overrides_reach_the_dataclass(tmp_path):
    options = parse_options(["run", str(ROOT / "recipes/fold_smollm2.yaml"), "--set", "seeds=2",
                             "sparsities=[0.1, 0.3]", "threads=2", "-o", str(tmp_path / "f.json"), "--overwrite"])
    assert type(options).__name__ == "FoldBenchOptions" and options.command == "bench-fold"
    assert (options.seeds, options.sparsities, options.threads) == (2, [0.1, 0.3], 2)
    assert options.output == str(tmp_path / "f.json") and options.overwrite
    assert options.methods[0] == "fold:none::agglomerative"  # the rest of the recipe is kept
    # the same settings as flags give the same dataclass
    flags = parse_options(["bench-fold", "--seeds", "2", "--sparsities", "0.1", "0.3", "--threads", "2", "--tokens",
                           "2048", "--eval-tokens", "1024", "--methods", *options.methods, "--plot", options.plot,
                           "-o", str(tmp_path / "f.json")])
    assert flags == options
    with pytest.raises(Exception, match="unknown key 'seedz'"):
        parse_options(["run", str(ROOT / "recipes/fold_smollm2.yaml"), "--set", "seedz=2"])


def test_help_shows_each_commands_own_defaults():
    from hf_geocomp.cli import build_parser

    parser = build_parser()
    flat = {name: " ".join(parser.subcommands[name].format_help().split())
            for name in ("bench-h3", "bench-kv", "prune")}
    assert "calibration tokens (default: 2048)" in flat["bench-h3"]  # a default changed by the study's dataclass
    assert "calibration tokens (default: 4096)" in flat["bench-kv"]
    assert "--controls {plain,removed,reparam}" in flat["bench-h3"]
    assert "--sparsities SPARSITIES [SPARSITIES ...]" in flat["bench-h3"]
    assert "--output OUTPUT, -o OUTPUT output model folder" in flat["prune"]
    assert "saves the resolved recipe beside the results: <output stem>.recipe.yaml" in " ".join(
        parser.subcommands["run"].format_help().split())
    assert "--criteria CRITERIA [CRITERIA ...], --criterion CRITERIA [CRITERIA ...]" in " ".join(
        parser.subcommands["bench-prune-recovery"].format_help().split())


def test_lora_merge_reproduces_its_committed_result_and_saves_the_recipe(tmp_path, capsys, monkeypatch):
    """A committed command run again (no model: it joins committed files) gives the committed numbers; the resolved
    recipe written beside the output reruns it."""
    committed = json.loads((ROOT / "recipes/results/lora_smollm2_lm_merged.json").read_text())
    argv = shlex.split(committed["command"])[1:]
    out = tmp_path / "merged.json"
    argv[argv.index("-o") + 1] = str(out)
    monkeypatch.chdir(ROOT)  # the command names its inputs relative to the repository
    assert main(argv) == 0
    merged = json.loads(out.read_text())
    run_facts = ("command", "compute")  # how and on what it ran, not what it found
    assert {k: v for k, v in merged.items() if k not in run_facts} == {k: v for k, v in committed.items()
                                                                       if k not in run_facts}
    assert merged["compute"]["wall_seconds"] >= 0 and merged["compute"]["cpus"] >= 1
    saved = tmp_path / "merged.recipe.yaml"
    recipe = yaml.safe_load(saved.read_text())
    assert recipe["command"] == "lora-merge" and recipe["output"] == str(out) and len(recipe["results"]) == 3
    assert main(["run", str(saved), "-o", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["rows"] == merged["rows"]
    assert main(["run", str(saved)]) == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
