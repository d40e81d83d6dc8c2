"""The README as a user meets it: every Python snippet runs (on a tiny model), every file it names exists,
and every report table equals the results JSON it cites."""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)


@pytest.fixture(scope="module")
def tiny_job_dir(tmp_path_factory, tiny_llama_dir, text_file):
    from hf_geocomp.job import JobConfig, run_job

    out = tmp_path_factory.mktemp("job") / "out"
    run_job(JobConfig.from_dict(dict(
        model=tiny_llama_dir, calibration=f"file:{text_file}", tokens=256, block_size=32, batch_size=4,
        eval_data=[f"file:{text_file}"], eval_tokens=64, eval_block=32, windows=1, prefill=32, score=16,
        prune_baselines=[], kv_baselines=[], output=str(out), kv=dict(budget=0.5, method="aware"))), progress=False)
    return str(out)


def localise(code: str, tiny_llama_dir: str, text_file: str, job_dir: str) -> str:
    """The snippet with the bundled model and texts swapped for the tiny test ones (nothing else changes)."""
    code = code.replace('"smollm2-135m"', repr(tiny_llama_dir)).replace('"runs/smollm2-135m-geocomp"', repr(job_dir))
    code = code.replace('"shakespeare:calibration"', repr(f"file:{text_file}"))
    return re.sub(r"(?<![_a-z])tokens=\d+", "tokens=256, block_size=32", code)


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 5


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index, tiny_llama_dir, text_file, tiny_job_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # snippets write relative folders (adapter/, kv-plan/, ...)
    code = localise(SNIPPETS[index], tiny_llama_dir, text_file, tiny_job_dir)
    exec(compile(code, f"README.md snippet {index}", "exec"), {"__name__": "__readme__"})


def test_every_file_the_readme_names_exists():
    refs = set(re.findall(r"`([A-Za-z0-9_.\-]+(?:/[A-Za-z0-9_.\-]+)+\.(?:md|py|yaml|yml|json|png|txt|toml|sh))`", README))
    refs |= set(re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README))
    missing = sorted(r for r in refs if not (ROOT / r).exists())
    assert not missing, missing


def test_report_tables_match_their_json():
    from hf_geocomp.report import refresh

    for doc in ("README.md", "docs/results.md", "VERDICTS.md"):
        text = (ROOT / doc).read_text()
        assert refresh(text, ROOT) == text, f"{doc}: run `hf-geocomp report --readme {doc}`"


def test_report_blocks_take_a_list_and_can_be_bare(tmp_path):
    import json

    from hf_geocomp.errors import GeoCompError
    from hf_geocomp.report import refresh

    (tmp_path / "r.json").write_text(json.dumps({"command": "hf-geocomp bench-x", "baseline": {"ppl": 2.0},
                                                 "rows": [{"method": "a", "ppl": 3.0}],
                                                 "summary": [{"method": "a", "ppl_mean": 3.0, "p_vs_lora": 0.01}]}))
    doc = "<!-- report: r.json list=summary bare columns=method,p_vs_lora -->\nstale\n<!-- /report -->"
    assert refresh(doc, tmp_path) == ("<!-- report: r.json list=summary bare columns=method,p_vs_lora -->\n"
                                      "| method | p_vs_lora |\n|---|---|\n| a | 0.01 |\n<!-- /report -->")
    full = refresh("<!-- report: r.json -->\n<!-- /report -->", tmp_path)
    assert "`hf-geocomp bench-x`" in full and "Baseline: ppl 2." in full and "| a | 3 |" in full
    with pytest.raises(GeoCompError, match="has no list 'tests'; lists: rows, summary"):
        refresh("<!-- report: r.json list=tests -->\n<!-- /report -->", tmp_path)


def test_report_blocks_select_rows(tmp_path):
    import json

    from hf_geocomp.errors import GeoCompError
    from hf_geocomp.report import refresh

    rows = [{"method": "a", "kind": "kv", "budget": 0.25, "ppl": 3.0}, {"method": "b", "kind": "kv", "budget": 0.125,
                                                                        "ppl": 4.0}, {"method": "c", "kind": "prune", "ppl": 5.0}]
    (tmp_path / "r.json").write_text(json.dumps({"command": "x", "rows": rows}))
    out = refresh("<!-- report: r.json bare where=kind:kv,budget:0.25 columns=method,ppl -->\n<!-- /report -->",
                  tmp_path)
    assert "| a | 3 |" in out and "| b |" not in out and "| c |" not in out
    assert "| c | 5 |" in refresh("<!-- report: r.json bare where=budget:- columns=method,ppl -->\n<!-- /report -->",
                                  tmp_path)
    with pytest.raises(GeoCompError, match="no row of 'rows' matches"):
        refresh("<!-- report: r.json where=kind:fold -->\n<!-- /report -->", tmp_path)


def test_report_plots_a_files_paired_tests(tmp_path, capsys):
    import json

    from hf_geocomp.cli import main

    png = tmp_path / "kv.png"
    assert main(["report", str(ROOT / "recipes/results/kv_h3_smollm2.json"), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "| " not in capsys.readouterr().out  # the plot alone
    assert main(["report", str(ROOT / "recipes/results/prune_h3_minilm.json"), "--plot",  # accuracy differences
                 str(tmp_path / "minilm.png")]) == 0 and (tmp_path / "minilm.png").stat().st_size > 1000
    assert main(["report", str(ROOT / "recipes/results/kv_h3_smollm2.json"), "--plot", str(png)]) == 2
    assert "already exists" in capsys.readouterr().err and png.stat().st_size > 1000
    (tmp_path / "r.json").write_text(json.dumps({"command": "x", "rows": [{"method": "a", "ppl": 3.0}]}))
    assert main(["report", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")]) == 2
    assert "has no paired tests by budget and control" in capsys.readouterr().err
    assert not (tmp_path / "r.png").exists()
