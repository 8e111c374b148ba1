"""Beyond the report: ResCNN, the strong recipe, honest selection (--holdout, --select) and tools/sweep.py."""
import csv
import json
import os
import time

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dataset
import dataloader
import main
import models
from engine import loss
from engine import optim
from engine import recipes
from tools import results
from tools import sweep
from dataset import UserError
from conftest import ROOT, base_args


# ---------------------------------------------------------------------------------------------- ResCNN

def test_rescnn_shapes_count_flops_and_one_step():
    model = models.build_model("res")
    assert models.count_params(model) == 1_958_821  # as its docstring's table says
    x = torch.randn(4, 3, 100, 100)
    assert model(x).shape == (4, 5)
    with FlopCounterMode(display=False) as flops:
        model.eval()(x[:1])
    assert round(flops.get_total_flops() / 1e9, 2) == 1.73  # GFLOP forward per image, as documented
    model.train()
    opt = optim.make_optimizer(model.parameters(), 2e-3, 5e-2, "adamw")
    assert isinstance(opt, torch.optim.AdamW)
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 4]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_res_trains_with_the_short_recipe_by_default_and_strong_on_request():
    cfg, _ = recipes.resolve_config(main.parse_args(["--model", "res"]))
    assert cfg["preset"] == "short" and cfg["optimizer"] == "muon" and cfg["scheduler"] == "linear"
    assert cfg["select"] == "last" and cfg["ema"] == 0 and cfg["label_smoothing"] == 0.1
    assert loss.class_weights(cfg, "cpu").tolist() == [1, 1, 1, 1, 1.5]  # class 4, the one most often missed
    plain, _ = recipes.resolve_config(main.parse_args(["--model", "res", "--class-weights", "1,1,1,1,1"]))
    assert loss.class_weights(plain, "cpu").tolist() == [1] * 5
    assert cfg["tta"] and cfg["tta_views"] == "flip" and cfg["rotate"] == 0
    assert cfg["batch_size"] == 64 and cfg["epochs"] == 12 and cfg["early_stop"] is None and cfg["warmup"] == 1
    strong, _ = recipes.resolve_config(main.parse_args(["--model", "res", "--preset", "strong"]))
    assert strong["scheduler"] == "warmup_cosine" and strong["ema"] == 0.999 and strong["epochs"] == 100
    three, _ = recipes.resolve_config(main.parse_args(["--model", "three"]))
    assert three["preset"] == "report" and three["optimizer"] == "adam" and three["select"] == "val"
    assert cfg["whiten"] and strong["whiten"] and not three["whiten"]  # ResCNN's own first layer; ThreeCNN's trained
    trained, _ = recipes.resolve_config(main.parse_args(["--model", "res", "--no-whiten"]))
    assert not trained["whiten"] and trained["preset"] == "short"
    three_short, _ = recipes.resolve_config(main.parse_args(["--model", "three", "--preset", "short"]))
    assert not three_short["whiten"]


@pytest.mark.parametrize("flags,expect", [
    (["--model", "skip", "--preset", "strong"], "--preset strong is offered for --model res / three only"),
    (["--select", "holdout"], "--select holdout needs --holdout FRACTION"),
    (["--select", "last"], "--select last needs a fixed schedule"),
    (["--holdout", "0.6"], "--holdout 0.6: it must be 0 (off) or a fraction below 0.5"),
    (["--preset", "strong", "--class-weights", "auto"], "--class-weights auto follows the last validation recall"),
])
def test_selection_settings_that_would_peek_or_mean_nothing_are_refused(flags, expect):
    with pytest.raises(UserError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        recipes.resolve_config(main.parse_args(flags))


def test_warmup_then_cosine():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = optim.make_scheduler({**recipes.DEFAULTS, "scheduler": "warmup_cosine", "warmup": 3, "epochs": 7}, opt)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # rising over the 3 warmup epochs
    assert lrs[3:] == pytest.approx([(1 + np.cos(np.pi * k / 4)) / 2 for k in range(4)])  # then a cosine


def test_a_warmup_cosine_run_resumed_with_more_epochs_follows_the_longer_schedule(tiny_data, tmp_path, run_main):
    flags = ("--scheduler", "warmup_cosine", "--warmup", "1", "--lr", "1e-3")
    assert run_main(base_args(tiny_data, tmp_path, "--epochs", "2", *flags))[0] == 0
    run = tmp_path / "runs" / "r"  # finished: its cosine came down to zero
    assert run_main(["--resume", run, "--epochs", "3"])[0] == 0
    lrs = [float(r["lr"]) for r in csv.DictReader(open(run / "log.csv"))]
    assert lrs == pytest.approx([5e-4, 1e-3, 5e-4])  # epoch 3 of a 3-epoch schedule: (1 + cos(pi / 2)) / 2


# ---------------------------------------------------------------------------------------------- holdout

def test_holdout_is_disjoint_stratified_and_reproducible():
    labels = np.repeat(np.arange(5), [100, 80, 60, 40, 20])
    train, held = dataset.holdout_split(labels, 0.1, seed=3)
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == len(labels)
    assert np.bincount(labels[held], minlength=5).tolist() == [10, 8, 6, 4, 2]  # 10% of every class
    again, held_again = dataset.holdout_split(labels, 0.1, seed=3)
    assert np.array_equal(held, held_again) and np.array_equal(train, again)
    assert not np.array_equal(held, dataset.holdout_split(labels, 0.1, seed=4)[1])


@pytest.mark.parametrize("loader", ["tensors", "images"])
def test_held_out_rows_are_never_trained_on(loader, tiny_data):
    """By the ids, and by the pixels the training batches hold: each batch image (flipped or not: its rows' sums do
    not change) is one of the images kept for training, none a held-out one."""
    cfg = {**recipes.DEFAULTS, "data_dir": tiny_data, "holdout": 0.2, "seed": 0, "batch_size": 8, "loader": loader,
           "workers": 0, "rotate": 0.0, "cache_dir": None}
    b = dataloader.loaders_for(cfg, "cpu", ["train", "holdout"], train_split="train")
    ids = dataset.read_split_csv(tiny_data, "train")["image_id"].tolist()
    assert set(b["train"].ids).isdisjoint(b["holdout"].ids) and len(b["holdout"].ids) == 5  # 1 of each class's 6
    assert sorted(b["train"].ids + b["holdout"].ids) == sorted(ids)
    data = dataset.load_split_tensors(tiny_data, "train", log=lambda *a: None)

    def rows(x):  # each image's pixel rows summed (the same for an image and its mirror), normalisation undone
        if x.is_floating_point():
            std, mean = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (dataloader.STD, dataloader.MEAN))
            x = (x * std + mean).round()
        return {tuple(v) for v in x.long().sum(3).flatten(1).tolist()}
    kept = rows(data["images"][[data["ids"].index(i) for i in b["train"].ids]])
    held = rows(data["images"][[data["ids"].index(i) for i in b["holdout"].ids]])
    gen = torch.Generator().manual_seed(0)
    trained = set().union(*(rows(x) for x, _, _ in b["train"].batches(b["train"].plan(gen), gen)))
    assert len(trained) == 8 and trained <= kept and trained.isdisjoint(held)  # one batch of 8 (the rest dropped)


def test_a_run_with_holdout_chooses_on_it_and_logs_it(tiny_data, tmp_path, run_main):
    rc, out, err = run_main(base_args(tiny_data, tmp_path, "--holdout", "0.2", "--epochs", "2"))
    assert rc == 0, err
    assert "holding out 5 of train.csv's rows" in out and "training on the other 11" in out and "holdout acc" in out
    folder = tmp_path / "runs" / "r"
    rows = list(csv.DictReader(open(folder / "log.csv")))
    assert all(r["holdout_acc"] != "" for r in rows)
    best = torch.load(folder / "best.pth", weights_only=True)
    assert best["best_acc"] == max(float(r["holdout_acc"]) for r in rows)  # chosen on the held-out rows
    assert json.load(open(folder / "config.json"))["select"] == "holdout"


def test_select_last_keeps_the_final_weights(tiny_data, tmp_path, run_main):
    rc, out, err = run_main(base_args(tiny_data, tmp_path, "--epochs", "3", "--select", "last", "--scheduler", "cosine",
                                      "--ema", "0.9"))
    assert rc == 0, err
    folder = tmp_path / "runs" / "r"
    best, last = (torch.load(folder / f, weights_only=True) for f in ("best.pth", "last.pth"))
    assert best["epoch"] == 3 and best["best_epoch"] == 3 and best["bad_epochs"] == 0
    assert all(torch.equal(best["ema_state_dict"][k], last["ema_state_dict"][k]) for k in last["ema_state_dict"])


# ---------------------------------------------------------------------------------------------- tools/sweep.py

def quick_flags(data, tmp_path):
    return ["--model", "three", "--data-dir", str(data), "--batch-size", "8", "--ckpt-dir", str(tmp_path / "ckpt"),
            "--cache-dir", str(tmp_path / "cache")]


def test_sweep_runs_seeds_at_once_reports_a_failing_run_and_records(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    lines = ["# a good recipe over two seeds, and one that fails",
             "python main.py " + " ".join(quick_flags(tiny_data, tmp_path)) + " --epochs 1",
             f"--model three --data-dir {tmp_path / 'nowhere'} --epochs 1 --seed 5   # its own seed: once"]
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    record = tmp_path / "results.csv"
    rc = sweep.main(["--file", str(tmp_path / "c.txt"), "--seeds", "0", "1", "--jobs", "3",
                     "--out-dir", str(tmp_path / "runs"), "--record", str(record)])
    out = capsys.readouterr().out
    assert rc == 1  # not every run finished
    outs = {o["name"]: o for o in json.load(open(tmp_path / "runs" / "sweep.json"))}
    assert sorted(outs) == ["01-three-s0", "01-three-s1", "02-three-s5"]
    errs = [open(tmp_path / "runs" / f"01-three-s{s}.err").read() for s in (0, 1)]  # shown if a run failed
    assert outs["01-three-s0"]["status"] == outs["01-three-s1"]["status"] == "finished", (out, errs)
    assert outs["02-three-s5"]["status"] == "failed" and "data folder" in outs["02-three-s5"]["error"]
    assert "2 finished" in out and "02-three-s5 failed: error: data folder" in out
    assert all(os.path.exists(tmp_path / "runs" / n / "submission.csv") for n in ("01-three-s0", "01-three-s1"))
    threads = max(1, os.cpu_count() // 3)  # the cores shared by the three runs at once
    for n in ("01-three-s0", "01-three-s1"):
        assert f"{threads} threads)" in json.load(open(tmp_path / "runs" / n / "config.json"))["device_name"]
    rows = results.read_rows(str(record))
    assert [r["seed"] for r in rows] == ["0", "1"] and list(rows[0]) == results.FIELDS
    assert all(r["selected_on_val"] == "yes" and float(r["val_acc"]) >= 0 and r["machine"] for r in rows)
    # named as the tables name recipes: what trained, the flags that changed it, and that the runs shared the cores
    assert {r["recipe"] for r in rows} == {f"report, --batch-size 8 --epochs 1 (three runs beside each other on the "
                                           f"same CPU cores, python -m tools.sweep --file {tmp_path / 'c.txt'})"}


def test_sweep_budget_stops_runs_resumably(tiny_data, tmp_path, capsys, monkeypatch):
    log = tmp_path / "runs" / "01-three-s0" / "log.csv"

    class Clock:  # the hour's budget is spent the moment the first run has logged an epoch: no real waiting
        sleep = staticmethod(time.sleep)

        @staticmethod
        def time():
            return time.time() + (3600 if log.exists() and len(log.read_text().splitlines()) > 1 else 0)
    monkeypatch.setattr(sweep, "time", Clock)
    flags = quick_flags(tiny_data, tmp_path) + ["--epochs", "500", "--early-stop", "500"]
    rc = sweep.main(["--seeds", "0", "1", "--jobs", "1", "--budget-min", "60", "--out-dir", str(tmp_path / "runs"),
                     "--", *flags])
    out = capsys.readouterr().out
    outs = {o["name"]: o for o in json.load(open(tmp_path / "runs" / "sweep.json"))}
    assert rc == 1 and "time budget of 60 min reached" in out
    assert outs["01-three-s0"]["status"] == "stopped" and outs["01-three-s1"]["status"] == "not started"
    last = torch.load(tmp_path / "runs" / "01-three-s0" / "last.pth", weights_only=True)
    assert not last["finished"] and last["epoch"] >= 1  # saved on SIGTERM: --resume continues it
    assert "resume with: python main.py --resume" in open(tmp_path / "runs" / "01-three-s0.out").read()


def test_the_campaign_files_are_commands_main_py_accepts(tmp_path):
    for name in ("campaign.txt", "campaign-ensemble.txt", "campaign-9min.txt"):
        commands = sweep.read_commands(os.path.join(ROOT, "experiments", name), "dataset")
        assert commands and all("DATA" not in c for c in commands)
        for flags in commands:
            recipes.resolve_config(main.parse_args(flags))  # every line is a valid main.py command
    with pytest.raises(SystemExit, match="names its data folder DATA"):
        sweep.read_commands(os.path.join(ROOT, "experiments", "campaign.txt"))


def test_a_run_from_before_these_settings_resumes_with_their_defaults(tiny_data, tmp_path, run_main):
    assert run_main(base_args(tiny_data, tmp_path, "--epochs", "1"))[0] == 0
    last = tmp_path / "runs" / "r" / "last.pth"
    ck = torch.load(last, weights_only=True)
    for k in ("optimizer", "warmup", "select", "holdout"):
        del ck["config"][k]
    ck["finished"], ck["config"]["epochs"] = False, 2
    torch.save(ck, last)
    rc, out, err = run_main(["--resume", last])
    assert rc == 0, err
    assert torch.load(last, weights_only=True)["epoch"] == 2
