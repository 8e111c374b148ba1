"""The measured results: docs/results.csv (one row per run) rendered as the tables users read.

    python results.py            rewrite docs/results.md and the summary table in README.md from the CSV
    python results.py --check    exit 1 when either is out of step with the CSV (the tests run this)

A row: date, machine, model, recipe, command, seed, epochs, minutes, val_acc (%), holdout_acc (% on the
training rows the run held out with --holdout; empty without), class4_recall (on validation), selected_on_val (yes: the reported checkpoint was chosen by validation accuracy, as the report's recipe
does; no: a fixed schedule's final or EMA weights, or a choice made on images held out of train).
sweep.py --record appends rows here.
"""
import argparse
import csv
import os
import re
import statistics
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
CSV = os.path.join(ROOT, "docs", "results.csv")
MD = os.path.join(ROOT, "docs", "results.md")
README = os.path.join(ROOT, "README.md")
FIELDS = ["date", "machine", "model", "recipe", "command", "seed", "epochs", "minutes", "val_acc", "holdout_acc",
          "class4_recall", "selected_on_val"]
BEGIN, END = "<!-- results summary: made by results.py from docs/results.csv -->", "<!-- end of results summary -->"
MODEL_NAMES = {"three": "ThreeCNN", "skip": "SkipConCNN", "ensemble": "EnsembleCNN", "res": "ResCNN"}


def read_rows(path=CSV):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_rows(rows, path=CSV):
    """Add runs to the CSV (each a dict with FIELDS), writing the header when the file is new."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        if new:
            w.writeheader()
        w.writerows({k: r.get(k, "") for k in FIELDS} for r in rows)


def spread(values, digits=2):
    """'91.92' for one value (or several equal ones), 'mean ± std (min-max)' for several."""
    v = [float(x) for x in values if x != ""]
    if not v:
        return ""
    if min(v) == max(v):
        return f"{v[0]:.{digits}f}"
    return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f} ({min(v):.{digits}f}-{max(v):.{digits}f})"


def groups_of(rows):
    """The rows grouped by machine, model and recipe (the seeds of one recipe), in the CSV's order."""
    groups = {}
    for r in rows:
        groups.setdefault((r["machine"], r["model"], r["recipe"]), []).append(r)
    return groups


# A whole run on the real data: not the demo set, not a screening run at a short budget, not a run cut short
# ("(3 epochs)", ", 2 epochs", "stopped ...").
PART_RUN = re.compile(r"demo|screening|stopped|\(\d+ epochs|, \d+ epochs")
# The recipe `python main.py --model res` trains now ("short", and its votes and time budgets): README's table
# leads with its single models, then its votes. Its earlier forms are named "short, first form (...)",
# "short, second form (...)".
CURRENT = re.compile(r"^short(,(?! \w+ form)|$)")


def summary_table(rows, whole_best_first=None):
    """One line per machine, model and recipe: runs, accuracy (mean ± std over seeds), time. whole_best_first=N:
    only whole runs on the real data, N of them: the current recipe's (single models, then votes), then the
    others, best first (README's table)."""
    groups = groups_of(rows)
    if whole_best_first:
        keep = [k for k in groups if not PART_RUN.search(k[2]) and any(r["val_acc"] for r in groups[k])]
        mean = lambda k: statistics.mean(float(r["val_acc"]) for r in groups[k] if r["val_acc"])  # noqa: E731
        current = lambda k: bool(CURRENT.search(k[2]))  # noqa: E731
        keep = sorted(keep, key=lambda k: (current(k), current(k) and "vote" not in k[2], mean(k)), reverse=True)
        groups = {k: groups[k] for k in keep[:whole_best_first]}
    out = ["| model | recipe | machine | runs | val accuracy % | class-4 recall | epochs | minutes | chosen on val |",
           "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for (machine, model, recipe), g in groups.items():
        out.append(f"| {MODEL_NAMES.get(model, model)} | {recipe} | {machine} | {len(g)} | {spread(r['val_acc'] for r in g)} "
                   f"| {spread((r['class4_recall'] for r in g), 3)} | {spread((r['epochs'] for r in g), 0)} "
                   f"| {spread((r['minutes'] for r in g), 1)} | {'/'.join(sorted({r['selected_on_val'] for r in g}))} |")
    return out


def screening_table(rows):
    """The screening runs (judged on held-out training rows only, never on validation)."""
    out = ["| run or judgement | held-out accuracy % | epochs | minutes | seed | command |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["recipe"].startswith("screening"):
            out.append(f"| {r['recipe'].split(': ', 1)[-1]} | {r['holdout_acc']} | {r['epochs']} | {r['minutes']} "
                       f"| {r['seed']} | `{r['command']}` |")
    return out


def results_md(rows):
    lines = ["# Results", "", "Every run measured, one row of `docs/results.csv` each (this file is made from it by",
             "`python results.py`). `<real data>` is the competition data in the Kaggle layout. Accuracy is on the",
             "1,250 validation images (the demo sets: 200 in the old, 100 in the current); `chosen on val`: yes when the",
             "reported checkpoint was chosen by that same validation accuracy (the report's recipe does so), no for a fixed schedule's",
             "final or EMA weights or a choice on images held out of train. Held-out accuracy: on the rows of train.csv a",
             "run held out with --holdout (never trained on). Minutes: the whole command where known,",
             "else its epochs; empty where not recorded. \"AVX512 limited to AVX2\": a CPU with AVX512-BF16 run with",
             "PyTorch's ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 in fp32, a stand-in for an AVX2-only CPU",
             "(docs/performance.md).", "", "## By model and recipe", ""]
    lines += summary_table([r for r in rows if not r["recipe"].startswith("screening")])
    lines += ["", "## Screening", "", "Runs and judgements that chose the recipe of `--preset short`, each on the 10% of "
              "train.csv", "held out by `--holdout 0.1 --seed 0` (the same rows every time), never on validation "
              "(docs/screening.md).", ""]
    lines += screening_table(rows)
    lines += ["", "## Every run", "", "| date | machine | model | recipe | command | seed | epochs | minutes | val acc % "
              "| held-out acc % | class-4 recall | chosen on val |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append("| " + " | ".join(f"`{r[k]}`" if k == "command" else r[k] for k in FIELDS) + " |")
    return "\n".join(lines) + "\n"


def readme_with_summary(text, rows):
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{README} has no results block ({BEGIN} ... {END})")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    return head + BEGIN + "\n" + "\n".join(summary_table(rows, whole_best_first=8)) + "\n" + END + tail


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check that docs/results.md and README.md are in step")
    a = p.parse_args(argv)
    rows = read_rows()
    want = {MD: results_md(rows), README: readme_with_summary(open(README).read(), rows)}
    stale = [path for path, text in want.items() if not os.path.exists(path) or open(path).read() != text]
    if a.check:
        for path in stale:
            print(f"{os.path.relpath(path, ROOT)} is out of step with docs/results.csv: run python results.py")
        return 1 if stale else 0
    for path in stale:
        with open(path, "w") as f:
            f.write(want[path])
        print(f"wrote {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
