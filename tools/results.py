"""The measured results: docs/results.csv (one row per run) rendered as the tables users read.

    python -m tools.results            rewrite docs/results.md, the summary table in README.md and the picture of
                                 accuracy against minutes (docs/time_to_accuracy.png) from the CSV
    python -m tools.results --check    exit 1 when the tables are out of step with the CSV (the tests run this)

A row: date, machine, model, recipe, command, seed, epochs, minutes, val_acc (%), holdout_acc (% on the
training rows the run held out with --holdout; empty without), class4_recall (on validation), selected_on_val (yes: the reported checkpoint was chosen by validation accuracy, as the report's recipe
does; no: a fixed schedule's final or EMA weights, or a choice made on images held out of train).
tools/sweep.py --record appends rows here.
"""
import argparse
import csv
import os
import re
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSV = os.path.join(ROOT, "docs", "results.csv")
MD = os.path.join(ROOT, "docs", "results.md")
README = os.path.join(ROOT, "README.md")
CURVE = os.path.join(ROOT, "docs", "time_to_accuracy.png")
CURVE_MACHINE = "CPU, 2 cores, AVX512-BF16"  # where the curve's points were measured, but for one series:
SLOWER_CPU = "CPU, 2 cores, AVX512-BF16, AMD EPYC (Zen 4)"  # its own series: it trains at about half the speed
FIELDS = ["date", "machine", "model", "recipe", "command", "seed", "epochs", "minutes", "val_acc", "holdout_acc",
          "class4_recall", "selected_on_val"]
BEGIN, END = "<!-- results summary: made by tools/results.py from docs/results.csv -->", "<!-- end of results summary -->"
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


def epochs_of(rows):
    """Their epochs: whole numbers as such, a fractional --epochs (as --minutes sizes it) to two decimals."""
    values = [r["epochs"] for r in rows]
    whole = all(float(v).is_integer() for v in values if v != "")
    return spread(values, 0 if whole else 2)


def groups_of(rows):
    """The rows grouped by machine, model and recipe (the seeds of one recipe), in the CSV's order."""
    groups = {}
    for r in rows:
        groups.setdefault((r["machine"], r["model"], r["recipe"]), []).append(r)
    return groups


# A whole run on the real data: not the demo set, not a screening run at a short budget, not a run cut short
# ("(3 epochs)", ", 2 epochs", "stopped ..."), not one whose minutes other work on the machine stretched
# ("tests ran beside it").
PART_RUN = re.compile(r"demo|screening|stopped|\(\d+ epochs|, \d+ epochs|beside")
# A run of a fixed number of epochs that other work on the machine slowed ("(tests ran beside it: ...)") trained as
# any other: README's table counts its accuracy with its recipe's other seeds and leaves its minutes out. A --minutes
# run so slowed fitted fewer epochs, so it stays out.
SLOWED = re.compile(r" \([^()]*beside[^()]*\)$")
# The recipes `python main.py --model res` trains now ("short", and its votes and time budgets, and "hour", its
# --preset hour): README's table leads with their single models, then their votes. Earlier forms of "short" are
# named "short, first form (...)", "short, second form (...)", "short, third form (...)".
CURRENT = re.compile(r"^(short|hour)(,(?! \w+ form)|$)")
# Its third form, the preset before ResCNN's first layer became a frozen whitening (--no-whiten): a curve of its own.
THIRD = re.compile(r"^short, third form")


def summary_table(rows, whole_best_first=None):
    """One line per machine, model and recipe: runs, accuracy (mean ± std over seeds), time. whole_best_first=N:
    only whole runs on the real data, N of them: the current recipe's (single models, then votes), then the
    others, best first (README's table), a slowed run of fixed epochs counted without its minutes (SLOWED)."""
    if whole_best_first:
        rows = [dict(r, recipe=SLOWED.sub("", r["recipe"]), minutes="")
                if SLOWED.search(r["recipe"]) and "--minutes" not in r["recipe"] else r for r in rows]
    groups = groups_of(rows)
    if whole_best_first:
        keep = [k for k in groups if not PART_RUN.search(k[2]) and any(r["val_acc"] for r in groups[k])]
        mean = lambda k: statistics.mean(float(r["val_acc"]) for r in groups[k] if r["val_acc"])  # noqa: E731
        current = lambda k: bool(CURRENT.search(k[2]))  # noqa: E731
        # the current recipes' single models, the best one's (hour) first, then those of the curve's machine
        # (another machine's run is not a better or worse recipe, only a slower CPU), then their votes, then the
        # rest, best first
        keep = sorted(keep, key=lambda k: (current(k), current(k) and "vote" not in k[2], k[2].startswith("hour"),
                                           k[0] == CURVE_MACHINE, mean(k)), reverse=True)
        groups = {k: groups[k] for k in keep[:whole_best_first]}
    out = ["| model | recipe | machine | runs | val accuracy % | class-4 recall | epochs | minutes | chosen on val |",
           "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for (machine, model, recipe), g in groups.items():
        out.append(f"| {MODEL_NAMES.get(model, model)} | {recipe} | {machine} | {len(g)} | {spread(r['val_acc'] for r in g)} "
                   f"| {spread((r['class4_recall'] for r in g), 3)} | {epochs_of(g)} "
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
             "`python -m tools.results`). `<real data>` is the competition data in the Kaggle layout. Accuracy is on the",
             "1,250 validation images (the demo sets: 200 in the old, 100 in the current); `chosen on val`: yes when the",
             "reported checkpoint was chosen by that same validation accuracy (the report's recipe does so), no for a fixed schedule's",
             "final or EMA weights or a choice on images held out of train. Held-out accuracy: on the rows of train.csv a",
             "run held out with --holdout (never trained on). Minutes: the whole command where known,",
             "else its epochs; empty where not recorded. \"AVX512 limited to AVX2\": a CPU with AVX512-BF16 run with",
             "PyTorch's ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 in fp32, a stand-in for an AVX2-only CPU",
             "(docs/performance.md).", "", "## By model and recipe", ""]
    lines += summary_table([r for r in rows if not r["recipe"].startswith("screening")])
    lines += ["", "## Screening", "", "Runs and judgements that chose the recipes of `--preset short` and `hour`, "
              "each on the 10% of train.csv", "held out by `--holdout 0.1 --seed 0` (seed 0: the same rows every time; \"second split\": "
              "`--holdout 0.1 --seed 1`,", "\"third split\": `--seed 2`, and so on), never on validation "
              "(docs/screening.md).", ""]
    lines += screening_table(rows)
    lines += ["", "## Every run", "", "| date | machine | model | recipe | command | seed | epochs | minutes | val acc % "
              "| held-out acc % | class-4 recall | chosen on val |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append("| " + " | ".join(f"`{r[k]}`" if k == "command" else r[k] for k in FIELDS) + " |")
    return "\n".join(lines) + "\n"


# ==============================================================================================
# Accuracy against minutes

def curve_series(rows):
    """The curve's points, (minutes, validation %, label) per series, from whole runs on the real data on
    CURVE_MACHINE: the current recipe's single models (--minutes N, and its fixed 12 epochs), its third form (the
    first layer trained), ThreeCNN under it, and the report's ThreeCNN recipe, the reference; and on SLOWER_CPU,
    `--model res`'s single models (short, or hour where --minutes holds 7 of its epochs), a series of its own."""
    def points(keep, machine=CURVE_MACHINE):
        return sorted((float(r["minutes"]), float(r["val_acc"]), label(r)) for r in rows
                      if r["machine"] == machine and r["minutes"] and r["val_acc"] and keep(r))

    def label(r):
        minutes = re.search(r"--minutes (\d+)", r["command"])
        return f"--minutes {minutes.group(1)}" if minutes else f"{r['epochs']} epochs"
    whole = lambda r: (not PART_RUN.search(r["recipe"]) and "vote" not in r["recipe"]  # noqa: E731
                       and "holdout" not in r["command"])
    single = lambda r: whole(r) and not r["recipe"].startswith("hour")  # noqa: E731
    return {
        "ResCNN, --preset short (ours)": points(lambda r: r["model"] == "res" and bool(CURRENT.search(r["recipe"]))
                                                  and single(r)),
        "ResCNN, --preset short --no-whiten": points(lambda r: r["model"] == "res" and bool(THIRD.search(r["recipe"]))
                                                     and single(r)),
        "ThreeCNN, --preset short": points(lambda r: r["model"] == "three" and bool(CURRENT.search(r["recipe"]))
                                           and single(r)),
        "ThreeCNN, the report's recipe": points(lambda r: r["model"] == "three" and r["recipe"] == "report"),
        "ResCNN, --model res, on an AMD EPYC (Zen 4): half as fast": points(
            lambda r: r["model"] == "res" and bool(CURRENT.search(r["recipe"])) and whole(r), SLOWER_CPU),
    }


def plot_curve(rows, path=CURVE):
    """Validation accuracy against minutes a run (training, evaluation and submission) on CURVE_MACHINE: every run
    a dot, and a line through the means of the runs of one setting (their seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for (name, pts), marker in zip(curve_series(rows).items(), "o^sDv"):
        if not pts:
            continue
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle="", alpha=0.5)[0]
        means = {}
        for m, acc, text in pts:
            means.setdefault(text, []).append((m, acc))
        mean = sorted((statistics.mean(m for m, _ in v), statistics.mean(a for _, a in v), t) for t, v in means.items())
        ax.plot([p[0] for p in mean], [p[1] for p in mean], marker=marker, color=line.get_color(), label=name)
        for m, acc, text in mean:
            ax.annotate(text, (m, acc), textcoords="offset points", xytext=(0, 7), fontsize=7, ha="center")
    ax.set_xscale("log")
    ticks = [5, 10, 15, 30, 60, 120, 240]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlim(4, 300)
    ax.margins(y=0.15)
    ax.set_xlabel("minutes a run, training to submission (log scale)")
    ax.set_ylabel("validation accuracy %")
    ax.set_title(f"Accuracy against time, {CURVE_MACHINE} but where named (docs/results.csv)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def readme_with_summary(text, rows):
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{README} has no results block ({BEGIN} ... {END})")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    return head + BEGIN + "\n" + "\n".join(summary_table(rows, whole_best_first=19)) + "\n" + END + tail


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check that docs/results.md and README.md are in step")
    a = p.parse_args(argv)
    rows = read_rows()
    want = {MD: results_md(rows), README: readme_with_summary(open(README).read(), rows)}
    stale = [path for path, text in want.items() if not os.path.exists(path) or open(path).read() != text]
    if a.check:
        for path in stale:
            print(f"{os.path.relpath(path, ROOT)} is out of step with docs/results.csv: run python -m tools.results")
        return 1 if stale else 0
    for path in stale:
        with open(path, "w") as f:
            f.write(want[path])
        print(f"wrote {os.path.relpath(path, ROOT)}")
    plot_curve(rows)
    print(f"wrote {os.path.relpath(CURVE, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
