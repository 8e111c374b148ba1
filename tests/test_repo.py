"""The project's promises about itself: the README's two commands, CI running the same, every flag documented."""
import os
import subprocess

import main
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


def test_every_flag_is_in_the_readme():
    text = readme()
    parser_flags = [s for a in main.build_parser()._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    assert len(parser_flags) > 40  # BooleanOptionalAction gives --x and --no-x
    missing = [f for f in parser_flags if f not in text]
    assert not missing, missing


def test_no_images_but_the_readme_pictures_are_tracked():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    images = [f for f in files if f.lower().endswith((".png", ".webp", ".jpg", ".jpeg"))]
    assert all(f.startswith("docs/") for f in images), images
