"""The project's promises about itself: the README's two commands, CI running the same, every flag documented,
the results tables and the time-to-accuracy curve from docs/results.csv, and a docstring atop every file."""
import glob
import os
import re
import subprocess

import main
from tools import results
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
    missing = [f for f in parser_flags if not re.search(re.escape(f) + r"(?![\w-])", text)]  # --tta: not --tta-views
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
    def row(recipe, acc, seed="0", machine=results.CURVE_MACHINE):
        return dict(date="2026-12-02", machine=machine, model="res", recipe=recipe, command="c", seed=seed,
                    epochs="12", minutes="30", val_acc=acc, holdout_acc="", class4_recall="0.85", selected_on_val="no")
    rows = [row("short, first form (AdamW over 32 epochs)", "95.0"), row("short", "93.0"), row("short", "93.4", "1"),
            row("report", "94.0"), row("short, second form (Muon)", "94.5"), row("screening, 8 epochs: x", "99.0"),
            row("short, --minutes 30", "92.0"), row("short, soft vote of 2 seeds", "94.0"),
            row("short, third form (first layer trained), --minutes 15", "94.8"),
            row("short, --minutes 30 (fp32)", "93.9", machine="CPU, 2 cores, AVX2 only (emulated)"),
            row("hour", "96.1", machine="NVIDIA H200")]
    table = results.summary_table(rows, whole_best_first=8)[2:]
    # the best single model's recipe leads, on whatever machine; another machine's run of the current recipe
    # follows the curve machine's, however it scored
    assert [line.split(" | ")[1] for line in table] == [
        "hour", "short", "short, --minutes 30", "short, --minutes 30 (fp32)", "short, soft vote of 2 seeds",
        "short, first form (AdamW over 32 epochs)", "short, third form (first layer trained), --minutes 15",
        "short, second form (Muon)"]


def test_readmes_table_counts_a_slowed_run_of_fixed_epochs_for_its_accuracy_not_its_minutes():
    def row(recipe, acc, minutes, seed):
        return dict(date="2026-12-03", machine="CPU", model="three", recipe=recipe, command="c", seed=seed,
                    epochs="12", minutes=minutes, val_acc=acc, holdout_acc="", class4_recall="0.85",
                    selected_on_val="no")
    rows = [row("short (tests ran beside it: epochs of 191-386 s)", "92.0", "30.0", "0"),
            row("short", "91.0", "20.0", "1"), row("short", "90.0", "18.0", "2"),
            row("short, --minutes 15 (tests ran beside it)", "95.0", "16.0", "0")]
    assert results.summary_table(rows, whole_best_first=6)[2:] == [
        "| ThreeCNN | short | CPU | 3 | 91.00 ± 1.00 (90.00-92.00) | 0.850 | 12 | 19.0 ± 1.4 (18.0-20.0) | no |"]


def test_readmes_table_gives_whole_epochs_as_such_and_a_fractional_epochs_to_two_decimals():
    def row(model, epochs):
        return dict(date="2026-12-05", machine="CPU", model=model, recipe="short", command="c", seed="0",
                    epochs=epochs, minutes="57.0", val_acc="95.0", holdout_acc="", class4_recall="0.85",
                    selected_on_val="no")
    table = results.summary_table([row("res", "8.3538"), row("res", "8.4"), row("three", "12")], whole_best_first=6)
    assert [line.split(" | ")[6] for line in table[2:]] == ["8.38 ± 0.03 (8.35-8.40)", "12"]


def test_the_time_to_accuracy_curve_takes_whole_single_runs_on_its_cpu_and_draws_them(tmp_path):
    def row(recipe, acc, minutes, model="res", machine=results.CURVE_MACHINE, command="python main.py --model res"):
        return dict(date="2026-12-03", machine=machine, model=model, recipe=recipe, command=command, seed="0",
                    epochs="12", minutes=minutes, val_acc=acc, holdout_acc="", class4_recall="0.85",
                    selected_on_val="no")
    rows = [row("short", "94.0", "31"), row("short, --minutes 15", "93.0", "14.5", command="x --minutes 15"),
            row("short", "99.0", "5", machine="NVIDIA H200"), row("short, soft vote of 3 seeds", "95.0", "95"),
            row("short, --minutes 15 (tests ran beside it)", "92.0", "23", command="x --minutes 15"),
            row("short", "91.0", "20", command="python main.py --model res --holdout 0.1"),
            row("short, first form (AdamW over 32 epochs)", "93.5", "70"), row("report", "91.9", "228", "three"),
            row("short", "90.0", "12", "three"),
            row("short, third form (first layer trained), --minutes 15", "94.1", "14",
                command="x --minutes 15 --no-whiten"),
            row("hour, --minutes 60 (moved to hour)", "95.8", "54", machine=results.SLOWER_CPU,
                command="x --minutes 60"),
            row("hour, paused 4 minutes for tests", "96.2", "90", machine=results.SLOWER_CPU),
            row("short, --minutes 15", "93.5", "14", machine=results.SLOWER_CPU, command="x --minutes 15"),
            row("hour, soft vote of 3", "95.5", "251", machine=results.SLOWER_CPU),
            row("screening, 7 epochs", "94.7", "57", machine=results.SLOWER_CPU)]
    series = results.curve_series(rows)
    assert series["ResCNN, --preset short (ours)"] == [(14.5, 93.0, "--minutes 15"), (31.0, 94.0, "12 epochs")]
    assert series["ResCNN, --preset short --no-whiten"] == [(14.0, 94.1, "--minutes 15")]
    assert series["ThreeCNN, --preset short"] == [(12.0, 90.0, "12 epochs")]
    assert series["ThreeCNN, the report's recipe"] == [(228.0, 91.9, "12 epochs")]
    assert series["ResCNN, --model res, on an AMD EPYC (Zen 4): half as fast"] == [
        (14.0, 93.5, "--minutes 15"), (54.0, 95.8, "--minutes 60"), (90.0, 96.2, "12 epochs")]
    results.plot_curve(rows, str(tmp_path / "c.png"))
    assert open(tmp_path / "c.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_readme_is_short_and_every_file_says_what_it_owns():
    """Sizes of files and functions are a guide for judgment, not a rule that forces a split: not tested."""
    assert len(readme().splitlines()) <= 250
    for folder in ("", "engine", "tools", "tests"):
        for path in glob.glob(os.path.join(ROOT, folder, "*.py")):
            assert open(path).read().lstrip().startswith('"""'), f"{path} opens with no docstring saying what it owns"


def test_the_root_holds_what_the_project_is_known_by_and_nothing_edits_sys_path():
    """The engine is one package and the tools are apart; everything imports from the root as it is."""
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py"))) == [
        "dataloader.py", "dataset.py", "main.py", "models.py"]
    sources = [p for folder in ("", "engine", "tools", "tests", "experiments")
               for p in glob.glob(os.path.join(ROOT, folder, "*.py"))]
    edits = re.compile(r"sys\.path\s*(\.|\[|\+|=)")  # an insert, an assignment or an addition
    assert not [p for p in sources if edits.search(open(p).read())]
    models_imports = re.findall(r"^(?:from|import) (\S+)", open(os.path.join(ROOT, "models.py")).read(), re.M)
    assert "engine.checkpoint" not in models_imports and "engine" not in models_imports  # models.py loads nothing
    assert "torch.load" not in open(os.path.join(ROOT, "models.py")).read()
