"""The project's promises about itself: the README's two commands, CI running the same, every flag documented,
the results tables in step with docs/results.csv, and the size limits of the code."""
import ast
import glob
import os
import subprocess

import main
import results
from conftest import ROOT


def readme():
    return open(os.path.join(ROOT, "README.md")).read()


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    lines = readme().splitlines()
    assert lines[0] == "```bash" and lines[3] == "```"
    demo, tests = lines[1], lines[2]
    assert demo == "pip install -r requirements.txt && python main.py --model three --demo"
    assert tests == "pip install -r requirements.txt && python -m pytest -q tests"
    assert tests in open(os.path.join(ROOT, ".ci", "run")).read().splitlines()


def test_every_flag_is_in_the_readme_or_docs():
    text = readme() + "".join(open(f).read() for f in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    parser_flags = [s for a in main.build_parser()._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    assert len(parser_flags) > 40  # BooleanOptionalAction gives --x and --no-x
    missing = [f for f in parser_flags if f not in text]
    assert not missing, missing


def test_no_images_but_the_readme_pictures_are_tracked():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    images = [f for f in files if f.lower().endswith((".png", ".webp", ".jpg", ".jpeg"))]
    assert all(f.startswith("docs/") for f in images), images


def test_results_tables_are_in_step_with_the_csv(tmp_path, capsys):
    assert results.main(["--check"]) == 0, capsys.readouterr().out
    rows = results.read_rows()
    assert rows and all(list(r) == results.FIELDS for r in rows)
    assert all(r["selected_on_val"] in ("yes", "no") and r["date"] and r["machine"] for r in rows)
    stale = tmp_path / "results.csv"  # one more row: the tables are out of step until remade
    stale.write_text(open(results.CSV).read())
    results.append_rows([{**rows[0], "seed": "99"}], str(stale))
    assert len(results.read_rows(str(stale))) == len(rows) + 1
    assert results.results_md(results.read_rows(str(stale))) != open(results.MD).read()


def test_readmes_table_leads_with_the_current_recipe_its_votes_then_the_best_of_the_rest():
    def row(recipe, acc, seed="0"):
        return dict(date="2026-12-02", machine="CPU", model="res", recipe=recipe, command="c", seed=seed,
                    epochs="12", minutes="30", val_acc=acc, holdout_acc="", class4_recall="0.85", selected_on_val="no")
    rows = [row("short, first form (AdamW over 32 epochs)", "95.0"), row("short", "93.0"), row("short", "93.4", "1"),
            row("report", "94.0"), row("short, second form (Muon)", "94.5"), row("screening, 8 epochs: x", "99.0"),
            row("short, --minutes 30", "92.0"), row("short, soft vote of 2 seeds", "94.0")]
    table = results.summary_table(rows, whole_best_first=5)[2:]
    assert [line.split(" | ")[1] for line in table] == [
        "short", "short, --minutes 30", "short, soft vote of 2 seeds", "short, first form (AdamW over 32 epochs)",
        "short, second form (Muon)"]


def test_readme_is_short_and_no_file_or_function_is_too_long():
    assert len(readme().splitlines()) <= 250
    for path in glob.glob(os.path.join(ROOT, "*.py")):
        source = open(path).read()
        assert len(source.splitlines()) <= 400, path
        assert source.lstrip().startswith('"""'), f"{path} opens with no docstring saying what it owns"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno < 70, f"{path}: {node.name} is {node.end_lineno - node.lineno + 1} lines"
