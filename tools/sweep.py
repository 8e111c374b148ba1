"""Several trainings at once on one machine: seeds and recipe variants as concurrent main.py processes (a
run folder each), then one table grouped by recipe.

    python -m tools.sweep --seeds 0 1 2 --jobs 3 -- --model three --data-dir dataset
    python -m tools.sweep --file experiments/campaign.txt --data-dir dataset --jobs 6 --budget-min 9 --record

--file: one main.py command line per line ('python main.py' may stand before the flags; '#' starts a
comment). --seeds runs each command once per seed (a command with its own --seed runs once). --budget-min:
when the time is up, every run still going gets SIGTERM, saves a last.pth that `main.py --resume`
continues, and is reported as stopped; runs not started yet are reported as not started. Ctrl-C, SIGTERM and
SIGHUP do the same. A run that fails is reported with its one-line error; the others go on. --record appends a row per
run that has a result to docs/results.csv (python -m tools.results then remakes the tables), its recipe named as the
tables name them: the preset ('report' where none), the flags that changed it, and, where runs shared the machine,
that they did (their minutes are then not one run's alone).
"""
import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time

from engine import report
from tools import results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "main.py")
GRACE_S = 120  # after SIGTERM, how long a run may take to save its checkpoint before it is killed


# ==============================================================================================
# The jobs

def read_commands(path, data_dir=None):
    """The main.py flags of each command line in `path`; the word DATA stands for --data-dir's folder."""
    commands = []
    with open(path) as f:
        for line in f:
            words = shlex.split(line, comments=True)
            if words[:2] == ["python", "main.py"]:
                words = words[2:]
            if "DATA" in words and data_dir is None:
                raise SystemExit(f"tools/sweep.py: {path} names its data folder DATA: pass --data-dir FOLDER")
            if words:
                commands.append([data_dir if w == "DATA" else w for w in words])
    return commands


def plan_jobs(commands, seeds):
    """One job per command and seed: {name, model, recipe (the flags less --seed), seed, flags}."""
    jobs = []
    for i, flags in enumerate(commands):
        model = flags[flags.index("--model") + 1] if "--model" in flags else "three"
        own = flags[flags.index("--seed") + 1] if "--seed" in flags else None
        recipe = [w for k, w in enumerate(flags) if w != "--seed" and (k == 0 or flags[k - 1] != "--seed")]
        for seed in ([own] if own is not None or not seeds else seeds):
            seed = "0" if seed is None else str(seed)
            jobs.append(dict(name=f"{i + 1:02d}-{model}-s{seed}", model=model, recipe=" ".join(recipe), seed=seed,
                             flags=[*recipe, "--seed", seed]))
    return jobs


def launch(job, out_dir, jobs_at_once):
    """Start one main.py in a process group of its own: a Ctrl-C in the terminal reaches the sweep only, which
    then stops every run the same way (SIGTERM: save, then exit). Runs at once share the CPU cores: each gets
    cores / runs threads (OMP_NUM_THREADS, unless it is set already), since each would otherwise start a thread
    per core and, more threads than cores, they would wait on each other's spinning threads."""
    job["out"] = open(os.path.join(out_dir, f"{job['name']}.out"), "w")
    job["err"] = open(os.path.join(out_dir, f"{job['name']}.err"), "w")
    cmd = [sys.executable, MAIN, *job["flags"], "--out-dir", out_dir, "--run-name", job["name"], "--quiet"]
    env = dict(os.environ)
    if jobs_at_once > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs_at_once)))
    job["proc"] = subprocess.Popen(cmd, stdout=job["out"], stderr=job["err"], stdin=subprocess.DEVNULL,
                                   start_new_session=True, cwd=ROOT, env=env)
    job["start"] = time.time()
    print(f"started {job['name']}: python main.py {' '.join(job['flags'])}", flush=True)


class Signalled(Exception):
    """SIGTERM or SIGHUP (what `timeout`, a batch scheduler or a closed terminal sends) reached the sweep."""


def pass_signals_on():
    """SIGTERM and SIGHUP stop the sweep as Ctrl-C does: every run saves its last.pth and stops, and the sweep
    writes its table and sweep.json. A second one while the runs are stopping is ignored."""
    def handler(signum, frame):
        for s in wanted:
            signal.signal(s, signal.SIG_IGN)
        raise Signalled(signal.Signals(signum).name)
    wanted = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    return {s: signal.signal(s, handler) for s in wanted}


def run_all(jobs, out_dir, n, budget_s):
    """Keep n jobs running until all are done or the budget (or a Ctrl-C) stops them."""
    pending, running, t0 = list(jobs), [], time.time()
    try:
        while pending or running:
            while pending and len(running) < n and time.time() - t0 < budget_s:
                job = pending.pop(0)
                launch(job, out_dir, min(n, len(jobs)))
                running.append(job)
            for job in [j for j in running if j["proc"].poll() is not None]:
                finish(job)
                running.remove(job)
            if running and time.time() - t0 >= budget_s:
                print(f"time budget of {budget_s / 60:g} min reached: stopping {len(running)} run(s)", flush=True)
                break
            if not running and pending and time.time() - t0 >= budget_s:
                break
            time.sleep(0.2)
    except (KeyboardInterrupt, Signalled) as e:
        print(f"{e or 'Ctrl-C'}: stopping {len(running)} run(s)", flush=True)
    stop(running)
    for job in pending:
        job["status"] = "not started"


def stop(running):
    for job in running:
        job["proc"].send_signal(signal.SIGTERM)
    for job in running:
        try:
            job["proc"].wait(GRACE_S)
        except subprocess.TimeoutExpired:
            job["proc"].kill()
            job["proc"].wait()
        finish(job)


def finish(job):
    job["minutes"] = (time.time() - job["start"]) / 60
    job["rc"] = job["proc"].returncode
    job["out"].close()
    job["err"].close()


# ==============================================================================================
# What each run left

def outcome(job, out_dir):
    """status (finished / stopped / failed / not started), its error line, and its figures from the run folder."""
    run_dir = os.path.join(out_dir, job["name"])
    out = dict(job, status=job.get("status"), error="", val_acc="", class4_recall="", epochs="", select="val",
               machine="")
    if out["status"] == "not started":
        return out
    err = open(os.path.join(out_dir, f"{job['name']}.err")).read().strip().splitlines()
    try:
        rows = report.read_log(os.path.join(run_dir, "log.csv"))
    except OSError:  # failed before its run folder had a log
        rows = []
    cfg = read_json(os.path.join(run_dir, "config.json")) or {}
    rep = read_json(os.path.join(run_dir, "report.json"))
    out.update(select=cfg.get("select", "val"), machine=machine_name(cfg.get("device_name", "")),
               epochs=min(len(rows), cfg.get("epochs", len(rows))),  # a fractional --epochs: its share of the last
               preset=cfg.get("preset", ""))
    if rows and rows[-1]["holdout_acc"] is not None:  # --holdout: the reported epoch's accuracy on the held-out rows
        out["holdout_acc"] = f"{100 * reported_epoch(rows, out['select'])['holdout_acc']:.2f}"
    if job["rc"] == 0 and rep is not None:
        out.update(status="finished", val_acc=100 * rep["accuracy"], class4_recall=rep["classes"]["4"]["recall"])
    elif job["rc"] in (130, 143, -signal.SIGTERM, -signal.SIGKILL):
        out.update(status="stopped", val_acc=reported_acc(rows, out["select"]))
    else:
        line = next((e for e in reversed(err) if e.startswith("error:")), err[-1] if err else f"exit {job['rc']}")
        out.update(status="failed", error=line)
    return out


def reported_epoch(rows, select):
    """The log row of the epoch a run's selection reports (for a stopped run: where it stands)."""
    key = {"val": "val_acc", "holdout": "holdout_acc"}.get(select)
    return rows[-1] if key is None else max(rows, key=lambda r: r[key])


def reported_acc(rows, select):
    """The validation accuracy a stopped run stands at: that of the epoch its selection would report."""
    return 100 * reported_epoch(rows, select)["val_acc"] if rows else ""


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def machine_name(device_name):
    """'NVIDIA H200', or the CPU with its kind: the figures of the two kinds differ several times."""
    if not device_name.startswith("cpu"):
        return device_name
    from engine import runtime
    return f"CPU, {os.cpu_count()} cores, {'AVX512-BF16' if runtime.cpu_has_bf16() else 'AVX2 (no bf16)'}"


# ==============================================================================================
# The table, the record, the command line

def table(outs):
    """One line per recipe: runs by status, accuracy and class-4 recall as mean ± std, epochs, minutes."""
    lines = [f"{'runs':<24} {'val acc %':<28} {'class-4 recall':<28} {'epochs':<14} {'minutes':<20} recipe"]
    for recipe in dict.fromkeys(o["recipe"] for o in outs):
        group = [o for o in outs if o["recipe"] == recipe]
        counts = ", ".join(f"{sum(o['status'] == s for o in group)} {s}" for s in
                           ("finished", "stopped", "failed", "not started") if any(o["status"] == s for o in group))
        lines.append(f"{counts:<24} {results.spread(o['val_acc'] for o in group):<28} "
                     f"{results.spread((o['class4_recall'] for o in group), 3):<28} "
                     f"{results.spread((o['epochs'] for o in group), 0):<14} "
                     f"{results.spread((o.get('minutes', '') for o in group), 1):<20} {recipe}")
    for o in outs:
        if o["status"] == "failed":
            lines.append(f"  {o['name']} failed: {o['error']}")
    return "\n".join(lines)


NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}
# flags (with their values) that the row says in its own columns or the recipe's name, or that do not change training
NAMED = ("--model", "--preset", "--data-dir", "--seed", "--ckpt-dir", "--cache-dir", "--out-dir", "--run-name")


def recipe_name(o, at_once, source):
    """The row's recipe as docs/results.csv names them: the recipe the run trained ('report' where it has no preset),
    the flags that changed it, how it ended, and, for runs that shared the machine, that they did (their minutes are
    then not one run's alone, and the tables leave them out of the time columns)."""
    words = o["flags"]
    extra = " ".join(w for k, w in enumerate(words)
                     if w not in NAMED and w != "--quiet" and (k == 0 or words[k - 1] not in NAMED))
    name = ("screening, " if o.get("holdout_acc", "") != "" else "") + (o.get("preset") or "report")
    name += f", {extra}" if extra else ""
    name += f", stopped by the sweep's time budget after epoch {o['epochs']}" if o["status"] == "stopped" else ""
    if at_once > 1:
        where = "one GPU" if not o["machine"].startswith("CPU") else "the same CPU cores"
        name += f" ({NUMBERS.get(at_once, at_once)} runs beside each other on {where}, {source})"
    return name


def result_rows(outs, at_once=1, source="python -m tools.sweep"):
    """docs/results.csv rows of the runs that have a result (finished, or stopped with an epoch done); `at_once`:
    how many ran at a time."""
    return [dict(date=f"{datetime.date.today()}", machine=o["machine"], model=o["model"],
                 recipe=recipe_name(o, at_once, source),
                 command=f"python main.py {' '.join(o['flags'])}", seed=o["seed"], epochs=o["epochs"],
                 minutes=f"{o['minutes']:.2f}", val_acc=f"{o['val_acc']:.2f}", holdout_acc=o.get("holdout_acc", ""),
                 class4_recall="" if o["class4_recall"] == "" else f"{o['class4_recall']:.3f}",
                 selected_on_val="yes" if o["select"] == "val" else "no")
            for o in outs if o["status"] in ("finished", "stopped") and o["val_acc"] != ""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", help="run each command once per seed")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    p.add_argument("--file", help="one main.py command line per line")
    p.add_argument("--data-dir", help="the folder that DATA stands for in --file's lines")
    p.add_argument("--out-dir", help="where the run folders go (default runs/sweep-<time>)")
    p.add_argument("--budget-min", type=float, default=float("inf"), help="stop every run still going after this")
    p.add_argument("--record", nargs="?", const=results.CSV, metavar="CSV",
                   help="append the results to docs/results.csv (or CSV)")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="after --: the main.py flags of one command")
    a = p.parse_args(argv)
    flags = a.flags[1:] if a.flags[:1] == ["--"] else a.flags
    if not a.file and not flags:
        p.error("give main.py flags after --, or --file")
    if a.file and not os.path.isfile(a.file):
        p.error(f"--file {a.file}: not found")
    jobs = plan_jobs(read_commands(a.file, a.data_dir) if a.file else [flags], a.seeds)
    out_dir = a.out_dir or os.path.join("runs", f"sweep-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    os.makedirs(out_dir, exist_ok=True)
    previous = pass_signals_on()
    try:
        run_all(jobs, out_dir, max(1, a.jobs), a.budget_min * 60)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    outs = [outcome(j, out_dir) for j in jobs]
    print(table(outs))
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump([{k: v for k, v in o.items() if k not in ("proc", "out", "err")} for o in outs], f, indent=2)
    if a.record:
        source = "python -m tools.sweep" + (f" --file {a.file}" if a.file else "")
        rows = result_rows(outs, min(max(1, a.jobs), len(jobs)), source)
        results.append_rows(rows, a.record)
        print(f"recorded {len(rows)} run(s) in {a.record}")
    return 0 if all(o["status"] == "finished" for o in outs) else 1


if __name__ == "__main__":
    sys.exit(main())
