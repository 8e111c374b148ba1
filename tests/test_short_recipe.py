"""The short-budget recipe's parts: the per-step linear schedule, the EMA's warm-up, the Muon optimizer, the shift
augmentation, a run made of them stopped mid-epoch and resumed exactly, the TTA views, judging on held-out rows,
and runs sized to a time budget (--minutes)."""
import csv
import json
import time
import types

import pytest
import torch

from engine import budget
import dataloader
import main
from engine import optim
from engine.ema import make_ema
from engine import recipes
from engine import train
from engine import trainstep
from conftest import base_args, stop_at_loss

from tools import judge_holdout


def test_linear_schedule_warms_up_then_falls_to_zero_at_the_last_step():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    cfg = {**recipes.DEFAULTS, "scheduler": "linear", "warmup": 0.5, "epochs": 3}
    sched = optim.make_scheduler(cfg, opt, steps_per_epoch=4)  # 12 steps, 2 of warmup
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0] + [(12 - k) / 10 for k in range(2, 12)])
    assert opt.param_groups[0]["lr"] == 0  # after the last step of the budget
    no_warmup = optim.make_scheduler({**cfg, "warmup": 0}, torch.optim.SGD([torch.zeros(1, requires_grad=True)], 1.0), 4)
    assert no_warmup.get_last_lr() == [1.0]


def test_the_ema_follows_the_model_closely_at_first_then_at_its_decay():
    model = torch.nn.Linear(1, 1, bias=False)
    ema = make_ema(model, 0.999)
    values = []
    for w in (1.0, 2.0, 3.0):
        model.weight.data.fill_(w)
        ema.update_parameters(model)
        values.append(ema.module.weight.item())
    # the first update copies; then the rate is (1 + n) / (10 + n): 2/11 after one update, 3/12 after two
    first = 1.0
    second = 2 / 11 * first + 9 / 11 * 2.0
    third = 3 / 12 * second + 9 / 12 * 3.0
    assert values == pytest.approx([first, second, third])
    for _ in range(20000):  # late in a run the rate is the decay itself
        ema.n_averaged += 1
    model.weight.data.fill_(0.0)
    before = ema.module.weight.item()
    ema.update_parameters(model)
    assert ema.module.weight.item() == pytest.approx(0.999 * before)


@pytest.mark.parametrize("optimizer", ["adam", "muon"])
def test_a_run_of_the_short_recipe_stopped_mid_epoch_resumes_exactly(optimizer, tiny_data, tmp_path, run_main,
                                                                     monkeypatch):
    """The linear schedule, EMA, shift and no rotation, stopped (as by SIGTERM) inside epoch 2 and resumed: the
    same weights, EMA, learning rates and log as the run that was never stopped; with Adam and with Muon."""
    flags = ("--batch-size", "4", "--epochs", "3", "--scheduler", "linear", "--warmup", "0.5", "--ema", "0.9",
             "--rotate", "0", "--shift", "3", "--select", "last", "--deterministic", "--lr", "1e-3",
             "--optimizer", optimizer, "--amp", "bf16", "--channels-last")  # no timing steps: they count as losses
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert run_main(base_args(tiny_data, ref, *flags))[0] == 0
    stop_at_loss(monkeypatch, 6)  # epoch 2, step 2 of 4
    assert run_main(base_args(tiny_data, cut, *flags))[0] == 143
    saved = torch.load(cut / "runs" / "r" / "last.pth", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 2)
    monkeypatch.undo()
    rc, out, err = run_main(["--resume", cut / "runs" / "r"])
    assert rc == 0, err
    a, b = (torch.load(d / "runs" / "r" / "last.pth", weights_only=True) for d in (ref, cut))
    for key in ("state_dict", "ema_state_dict"):
        assert all(torch.equal(v, b[key][k]) for k, v in a[key].items()), key
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 12
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"] == 0
    logs = [[{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(d / "runs" / "r" / "log.csv"))]
            for d in (ref, cut)]
    assert logs[0] == logs[1] and len(logs[0]) == 3


def test_a_fractional_epochs_trains_its_share_of_the_last_epoch_and_resumes_exactly_inside_it(
        tiny_data, tmp_path, run_main, monkeypatch):
    """--epochs 2.5 at 4 steps an epoch: 2 epochs, then 2 steps of a third (validated and logged as an epoch), the
    linear rate at zero after the 10th step; stopped inside the third and resumed, the same run."""
    assert [optim.epoch_steps(2.5, e, 4) for e in range(3)] == [4, 4, 2] and optim.total_steps(2.5, 4) == 10
    assert optim.epoch_steps(2.01, 2, 4) == 1 and optim.total_steps(3, 4) == 12  # at least one step; whole: all
    flags = ("--batch-size", "4", "--epochs", "2.5", "--scheduler", "linear", "--warmup", "0.5", "--select", "last",
             "--deterministic", "--lr", "1e-3", "--optimizer", "adamw", "--amp", "bf16", "--channels-last")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert run_main(base_args(tiny_data, ref, *flags))[0] == 0
    stop_at_loss(monkeypatch, 9)  # epoch 3, the first of its two steps
    assert run_main(base_args(tiny_data, cut, *flags))[0] == 143
    saved = torch.load(cut / "runs" / "r" / "last.pth", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (2, 1)  # the stop lands after the step it was asked in
    monkeypatch.undo()
    rc, out, err = run_main(["--resume", cut / "runs" / "r"])
    assert rc == 0 and "resuming" in out and "epoch 3, step 2" in out, err
    a, b = (torch.load(d / "runs" / "r" / "last.pth", weights_only=True) for d in (ref, cut))
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 10 and a["epoch"] == 3
    assert a["optimizer"]["param_groups"][0]["lr"] == 0 and a["config"]["epochs"] == 2.5
    logs = [[{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(d / "runs" / "r" / "log.csv"))]
            for d in (ref, cut)]
    assert logs[0] == logs[1] and len(logs[0]) == 3
    rc, out, _ = run_main(["--resume", ref / "runs" / "r"])
    assert rc == 0 and "already finished (epoch 3 of --epochs 2.5" in out
    before = (ref / "runs" / "r" / "last.pth").read_bytes()
    rc, out, err = run_main(["--resume", ref / "runs" / "r", "--epochs", "4"])  # its third epoch trained in part
    assert rc != 0 and "ended inside its last epoch (--epochs 2.5), so it cannot go on to --epochs 4" in err, err
    assert len(err.strip().splitlines()) == 1 and (ref / "runs" / "r" / "last.pth").read_bytes() == before


def test_tta_views_flip_is_the_image_and_its_mirror(tiny_data, tmp_path):
    x = torch.randn(2, 3, 100, 100)
    views = dataloader.tta_views(x, "flip")
    assert len(views) == 2 and torch.equal(views[0], x) and torch.equal(views[1], x.flip(3))
    assert len(dataloader.tta_views(x)) == 4  # flip_rotate, the default: also turned by +-8 degrees
    shifted = dataloader.tta_views(x, "flip_shift")
    assert len(shifted) == 6 and torch.equal(shifted[1], x.flip(3))
    assert torch.equal(shifted[2][:, :, 1:, 1:], x[:, :, :-1, :-1])  # down-right by one
    assert torch.equal(shifted[3][:, :, 1:, 1:], x.flip(3)[:, :, :-1, :-1])
    assert torch.equal(shifted[4][:, :, :-1, :-1], x[:, :, 1:, 1:]) and torch.equal(shifted[2][:, :, 0, 1:], x[:, :, 1, :-1])
    cfg, _ = recipes.resolve_config(main.parse_args(["--tta", "--tta-views", "flip"]))
    assert cfg["tta"] and cfg["tta_views"] == "flip"


def test_judge_holdout_reports_a_runs_held_out_rows_and_refuses_a_run_without(tiny_data, tmp_path, run_main, capsys):
    assert run_main(base_args(tiny_data, tmp_path, "--holdout", "0.3", "--epochs", "1"))[0] == 0
    best = tmp_path / "runs" / "r" / "best.pth"
    assert judge_holdout.main([str(best), str(best)]) == 0
    out = capsys.readouterr().out.splitlines()
    held = torch.load(best, weights_only=True)["best_acc"]
    assert out[0].startswith(f"{best} [none]") and f"held-out acc {100 * held:6.2f}%" in out[0]  # as the run logged
    assert len(out) == 12 and out[-1].startswith("soft vote of 2 [flip_shift]") and "(5 images)" in out[-1]
    assert judge_holdout.main([str(best), "--views", "flip"]) == 0
    assert [o.split("]")[0] for o in capsys.readouterr().out.splitlines()] == [f"{best} [flip"]
    assert run_main(base_args(tiny_data, tmp_path / "plain", "--epochs", "1"))[0] == 0
    with pytest.raises(SystemExit, match="without --holdout"):
        judge_holdout.main([str(tmp_path / "plain" / "runs" / "r" / "best.pth")])


def test_fit_epochs_counts_whole_epochs_then_the_steps_of_one_more_and_keeps_at_least_one():
    assert budget.fit_epochs(149.9, 50) == 2 and budget.fit_epochs(150, 50) == 3
    assert budget.fit_epochs(30, 500) == 1 and budget.fit_epochs(30, 500, at_least=0) == 0
    # 50 s epochs of 4 steps (10 s each) and 10 s of evaluation: 3 epochs in 150 s; 25 s more hold the evaluation
    # and one step (3.25), 49.9 s three (3.75), 9.9 s none: a fourth epoch's evaluation alone would not pay
    assert budget.fit_epochs(175, 50, judging_s=10, steps=4) == 3.25
    assert budget.fit_epochs(199.9, 50, judging_s=10, steps=4) == 3.75
    assert budget.fit_epochs(159.9, 50, judging_s=10, steps=4) == 3
    assert budget.fit_epochs(60, 500, judging_s=10, steps=195) == 1  # less than an epoch: at least one, whole


def test_the_step_timing_takes_its_fastest_window(monkeypatch):
    """A step slowed by something else on the machine (here, the first timed window) does not shrink the budget."""
    now, costs = [0.0], [5.0, 5.0] + [1.0] * 4 + [0.1] * 100  # set-up, a disturbed window, then undisturbed steps
    monkeypatch.setattr(budget, "time", types.SimpleNamespace(perf_counter=lambda: now[0], time=time.time))

    def step():
        now[0] += costs.pop(0)
    assert budget.seconds_each(step, 8) == pytest.approx(0.1)
    assert len(costs) == 100 - 16  # 4 disturbed calls fill a window of 10/3 s; two more windows of 8 calls


def run_clock(monkeypatch, step_s):
    """The run's clock (train.py's and budget.py's) moves only with training steps, step_s seconds each."""
    clock = [0.0]
    fake = types.SimpleNamespace(time=lambda: clock[0], perf_counter=time.perf_counter)
    monkeypatch.setattr(train, "time", fake)
    monkeypatch.setattr(budget, "time", fake)
    real_step = trainstep.step

    def step(state, x, y):
        clock[0] += step_s
        return real_step(state, x, y)
    monkeypatch.setattr(trainstep, "step", step)


def test_minutes_sizes_the_run_then_again_from_its_first_epoch_as_that_many_epochs_would_train(
        tiny_data, tmp_path, run_main, monkeypatch):
    """The timing runs a real step on a copy: the run's weights and random state are untouched. It reads the step
    three times slower than it is, so the run is sized too short; after its first epoch (whose rates, a warmup of
    one epoch, do not depend on the number) it is sized again from what that epoch took: the run is then the run
    of --epochs N. The number is saved, and a resume keeps it."""
    run_clock(monkeypatch, 10.0)  # 10 s a step, 2 steps an epoch: 20 s
    calls = []

    def timed(fn, steps):  # one real call (10 s on the clock); then 30 s a training step, 0 for evaluation
        fn()
        calls.append(steps)
        return 30.0 if steps == 8 else 0.0
    monkeypatch.setattr(budget, "seconds_each", timed)
    flags = ("--scheduler", "linear", "--warmup", "1", "--ema", "0.9", "--deterministic", "--select", "last",
             "--amp", "off", "--no-channels-last")
    sized = base_args(tiny_data, tmp_path / "a", "--minutes", "3", *flags)
    del sized[sized.index("--epochs"):sized.index("--epochs") + 2]
    rc, out, err = run_main(sized)
    assert rc == 0, err
    # before: (180 s x 0.92 - 10 s the trial step took - 20 s for the end) / 60 s an epoch: 2 epochs;
    # after the first: 1 + (180 - 30 s so far - 20) x 0.95 / 20 s it took: 7 epochs (0.92 of the whole: 6)
    assert calls == [8, 4] and "--minutes 3: an epoch takes ~60 s here (2 steps at 0 img/s" in out
    assert ": 2 epochs (saved with the run" in out, out
    assert "--minutes 3: the first epoch took 20 s: 7 epochs in all, not 2 (saved with the run)" in out
    run = tmp_path / "a" / "runs" / "r"
    assert json.load(open(run / "config.json"))["epochs"] == 7 and len(open(run / "log.csv").readlines()) == 8
    assert run_main(base_args(tiny_data, tmp_path / "b", "--epochs", "7", *flags))[0] == 0
    a, b = (torch.load(d / "runs" / "r" / "last.pth", weights_only=True) for d in (tmp_path / "a", tmp_path / "b"))
    assert a["config"]["epochs"] == 7 and a["optimizer"]["param_groups"][0]["lr"] == 0  # decayed to zero at its end
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())
    rc, out, _ = run_main(["--resume", run])
    assert rc == 0 and "already finished (epoch 7 of --epochs 7" in out
    rc, _, err = run_main(base_args(tiny_data, tmp_path / "c", "--minutes", "2", "--epochs", "3"))
    assert rc == 2 and "give --minutes or --epochs, not both" in err


def test_minutes_fills_its_budget_to_the_step_as_the_same_fractional_epochs_would_train(tiny_data, tmp_path, run_main,
                                                                                         monkeypatch):
    """Where the time whole epochs leave holds an evaluation and some steps of one more epoch, the run trains those
    steps too: a fractional --epochs, the run that --epochs gives it would train."""
    run_clock(monkeypatch, 10.0)  # 10 s a step, 2 steps an epoch: 20 s
    monkeypatch.setattr(budget, "seconds_each", lambda fn, steps: (fn(), 30.0 if steps == 8 else 0.0)[1])
    flags = ("--scheduler", "linear", "--warmup", "1", "--deterministic", "--select", "last", "--amp", "off",
             "--no-channels-last")
    sized = base_args(tiny_data, tmp_path / "a", "--minutes", "3.2", *flags)
    del sized[sized.index("--epochs"):sized.index("--epochs") + 2]
    rc, out, err = run_main(sized)
    assert rc == 0, err
    # after the first: (192 - 30 s so far - 20 for the end) x 0.95 = 134.9 s: 6 epochs of 20 s, and 14.9 s hold one
    # step of 10 s more (the evaluation is free here): 1 + 6.5 = 7.5 epochs
    assert "the first epoch took 20 s: 7.5 epochs in all, not 2 (saved with the run)" in out, out
    run = tmp_path / "a" / "runs" / "r"
    assert json.load(open(run / "config.json"))["epochs"] == 7.5 and len(open(run / "log.csv").readlines()) == 9
    assert run_main(base_args(tiny_data, tmp_path / "b", "--epochs", "7.5", *flags))[0] == 0
    a, b = (torch.load(d / "runs" / "r" / "last.pth", weights_only=True) for d in (tmp_path / "a", tmp_path / "b"))
    assert a["scheduler"]["last_epoch"] == 15 and a["optimizer"]["param_groups"][0]["lr"] == 0
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())


def test_a_run_sized_again_keeps_its_number_where_the_schedule_already_depends_on_it(tiny_data, tmp_path, run_main,
                                                                                       monkeypatch):
    """Without a warmup the linear rate falls from the first step over the number planned: changing it after the
    first epoch would bend the schedule, so the first sizing stands."""
    run_clock(monkeypatch, 10.0)
    monkeypatch.setattr(budget, "seconds_each", lambda fn, steps: (fn(), 30.0 if steps == 8 else 0.0)[1])
    sized = base_args(tiny_data, tmp_path, "--minutes", "3", "--scheduler", "linear", "--warmup", "0", "--amp", "off",
                      "--no-channels-last")
    del sized[sized.index("--epochs"):sized.index("--epochs") + 2]
    rc, out, err = run_main(sized)
    assert rc == 0, err
    assert ": 2 epochs (saved with the run" in out and "the first epoch took" not in out
    assert len(open(tmp_path / "runs" / "r" / "log.csv").readlines()) == 3


def test_the_short_preset_warms_up_for_an_epoch_then_decays_linearly_to_zero_over_its_12():
    cfg, _ = recipes.resolve_config(main.parse_args(["--model", "res"]))
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg["lr"])
    spe = 12500 // 64  # the real training split at batch 64: 195 steps an epoch
    sched = optim.make_scheduler(cfg, opt, spe)
    lrs = []
    for _ in range(12 * spe):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2e-3 / spe) and lrs[spe - 1] == pytest.approx(2e-3) == max(lrs)
    assert lrs[spe + 11 * spe // 2] == pytest.approx(1e-3, rel=1e-3)  # halfway down
    assert lrs[-1] == pytest.approx(2e-3 / (11 * spe)) and opt.param_groups[0]["lr"] == 0


def test_the_hour_preset_is_the_short_one_with_a_wider_full_resolution_stage_and_six_test_time_views(
        tiny_data, tmp_path, run_main, monkeypatch):
    hour, _ = recipes.resolve_config(main.parse_args(["--model", "res", "--preset", "hour"]))
    short, _ = recipes.resolve_config(main.parse_args(["--model", "res"]))
    assert {k: v for k, v in hour.items() if short[k] != v} == {"preset": "hour", "full_res_width": 64,
                                                                "tta_views": "flip_shift"}
    from engine import inference
    seen = []
    real = inference.predict_probs
    first_conv = lambda m: next(c for c in m.modules() if isinstance(c, torch.nn.Conv2d))  # noqa: E731
    monkeypatch.setattr(inference, "predict_probs", lambda *a, **k: (seen.append((first_conv(a[0]).out_channels,
                                                                                  a[5], a[2]["tta_views"])),
                                                                   real(*a, **k))[1])
    rc, _, err = run_main(base_args(tiny_data, tmp_path, "--model", "res", "--preset", "hour", "--epochs", "1",
                                    "--batch-size", "4", "--amp", "off", "--no-channels-last"))
    assert rc == 0, err
    assert seen == [(64, False, "flip_shift")] + [(64, True, "flip_shift")] * 2  # the epoch; validation, test
    rc, _, err = run_main(base_args(tiny_data, tmp_path, "--model", "three", "--preset", "hour"))
    assert rc != 0 and "--preset hour is offered for --model res only" in err and len(err.strip().splitlines()) == 1


def test_a_short_run_judges_each_epoch_without_tta_and_its_end_with_the_flip(tiny_data, tmp_path, run_main,
                                                                             monkeypatch):
    from engine import inference
    seen = []
    real = inference.predict_probs
    monkeypatch.setattr(inference, "predict_probs", lambda *a, **k: (seen.append((a[5], a[2]["tta_views"])),
                                                                   real(*a, **k))[1])
    args = base_args(tiny_data, tmp_path, "--model", "res", "--epochs", "2", "--batch-size", "4")
    rc, out, err = run_main(args)
    assert rc == 0, err
    assert seen == [(False, "flip")] * 2 + [(True, "flip")] * 2  # 2 epochs; then validation and test with TTA
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and not any("*best*" in line for line in epoch_lines)  # --select last: no mark


def test_an_epoch_line_marks_best_and_counts_towards_early_stopping_except_under_select_last():
    cfg = {"select": "val", "early_stop": 15}
    assert train.epoch_mark(cfg, True, 0) == "  *best*"
    assert train.epoch_mark(cfg, False, 3) == "  (3/15 without gain)"
    assert train.epoch_mark({**cfg, "select": "last"}, True, 0) == ""
    assert train.epoch_mark({**cfg, "early_stop": None}, False, 3) == "  (3 without gain)"


def test_the_short_preset_never_stops_early_its_schedule_runs_to_its_end(tiny_data, tmp_path, run_main, monkeypatch):
    """Judged on held-out rows, a longer run of the preset's linear decay may go many epochs without a better
    held-out accuracy before its rate comes down (a 24-epoch run went five): it trains on to its last epoch.
    --early-stop N, given, still stops it."""
    monkeypatch.setattr(train, "epoch_mark", lambda cfg, improved, bad: f" bad={bad}")
    # every epoch judged 50% on both splits: after the first, none is better
    monkeypatch.setattr(train.inference, "evaluate_split", lambda *a, **k: (1.0, 0.5, [0.5] * 5))
    flags = ("--preset", "short", "--holdout", "0.2", "--epochs", "14", "--amp", "off", "--no-channels-last")
    rc, out, err = run_main(base_args(tiny_data, tmp_path / "a", *flags))
    assert rc == 0, err
    marks = [line.split()[-1] for line in out.splitlines() if line.startswith("epoch ")]
    assert marks == [f"bad={n}" for n in range(14)]  # 13 epochs without gain, more than the preset's 12 epochs
    rc, out, err = run_main(base_args(tiny_data, tmp_path / "b", *flags, "--early-stop", "1"))
    assert rc == 0 and "early stop: no better held-out accuracy for 1 epochs" in out, err


def test_muon_steps_the_conv_weights_as_torch_muon_steps_their_matrices_and_the_rest_as_adamw():
    """--optimizer muon on a channels_last model: each conv weight moves exactly as torch.optim.Muon moves a
    2-D copy of it, every other parameter as AdamW moves it; the rate the schedule sets reaches both."""
    import copy
    import models
    torch.manual_seed(0)
    model = models.ThreeCNN().to(memory_format=torch.channels_last)
    twin, start = copy.deepcopy(model), model.features[0].weight.detach().clone()
    opt = optim.make_optimizer(model.parameters(), 2e-3, 0.05, "muon")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda done: 0.5 ** done)
    pairs = list(zip(model.parameters(), twin.parameters()))
    convs = [(p, torch.nn.Parameter(q.detach().permute(0, 2, 3, 1).reshape(q.shape[0], -1).clone()))
             for p, q in pairs if p.ndim == 4]
    rest = [q for p, q in pairs if p.ndim != 4]
    ref_muon = torch.optim.Muon([m for _, m in convs], lr=2e-3, weight_decay=0.05, adjust_lr_fn="match_rms_adamw")
    ref_adamw = torch.optim.AdamW(rest, lr=2e-3, weight_decay=0.05)
    x, y = torch.randn(4, 3, 100, 100).contiguous(memory_format=torch.channels_last), torch.tensor([0, 1, 2, 4])
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for p, m in convs:
            m.grad = p.grad.permute(0, 2, 3, 1).reshape(m.shape).clone()
        for (p, q) in pairs:
            q.grad = None if p.ndim == 4 else p.grad.clone()
        opt.step()
        sched.step()
        for ref in (ref_muon, ref_adamw):
            ref.step()
            ref.param_groups[0]["lr"] = sched.get_last_lr()[0]
    assert opt.param_groups[0]["lr"] == opt.param_groups[1]["lr"] == pytest.approx(2e-3 / 8)
    for p, m in convs:
        assert torch.allclose(p.detach().permute(0, 2, 3, 1).reshape(m.shape), m, atol=1e-6)
    assert all(torch.allclose(p, q, atol=1e-6) for (p, q) in pairs if p.ndim != 4)
    assert (model.features[0].weight - start).abs().max() > 1e-4  # the steps did something


def test_muon_reads_a_gradient_in_the_weights_column_order_whatever_the_gradients_layout():
    """A channels_last weight whose gradient arrives contiguous moves exactly as one whose gradient is
    channels_last too: the gradient's matrix is laid out as the weight's, not as its own memory happens to be."""
    torch.manual_seed(0)
    grads = torch.randn(8, 3, 3, 3), torch.randn(8)
    moved = []
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(1)
        conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
        opt = optim.make_optimizer(conv.parameters(), 2e-3, 0.05, "muon")
        conv.weight.grad, conv.bias.grad = grads[0].contiguous(memory_format=layout), grads[1].clone()
        opt.step()
        moved.append(conv.weight.detach().clone())
    assert torch.equal(moved[0], moved[1])


def test_muon_for_a_model_without_convolutions_to_train_is_one_line(tiny_data, tmp_path, run_main):
    rc, _, err = run_main(base_args(tiny_data, tmp_path, "--model", "ensemble", "--optimizer", "muon"))
    assert rc == 2 and err.strip().splitlines() == ["error: --optimizer muon steps the weights of convolutions, and "
                                                    "--model ensemble trains none (only the blend of its frozen bases): "
                                                    "use --optimizer adam or adamw"]
    assert not (tmp_path / "runs").exists()


def test_minutes_moves_to_the_hour_recipe_only_for_res_s_default_recipe_with_none_of_its_settings_given():
    def hour(*flags):
        cfg, given = recipes.resolve_config(main.parse_args(list(flags)))
        return recipes.hour_for_minutes(cfg, given)
    moved = hour("--model", "res", "--minutes", "60")
    assert (moved["preset"], moved["full_res_width"], moved["tta_views"]) == ("hour", 64, "flip_shift")
    assert hour("--model", "res", "--minutes", "60", "--no-whiten", "--seed", "3")["whiten"] is False  # given: kept
    for flags in (["--model", "res"], ["--model", "res", "--minutes", "60", "--preset", "short"],
                  ["--model", "res", "--minutes", "60", "--full-res-width", "48"],
                  ["--model", "res", "--minutes", "60", "--tta-views", "flip"],
                  ["--model", "three", "--minutes", "60"]):
        assert hour(*flags) is None, flags


def test_minutes_trains_the_hour_recipe_where_7_of_its_epochs_fit_and_keeps_short_where_they_do_not(
        tiny_data, tmp_path, run_main, monkeypatch):
    """Faked timings: short's step 1 s, hour's 2 s (1 step an epoch, 20 s for the end). 48 s hold 12 of hour's
    epochs, so the run is hour's, sized as hour's (and again after its first epoch), and says so; 33 s hold 10 of
    short's but only 5 of hour's, fewer than budget.HOUR_EPOCHS (7), so the run keeps short; 25 s hold fewer than 7
    even of short's, so hour's step is not even timed."""
    assert budget.HOUR_EPOCHS == 7
    run_clock(monkeypatch, 2.0)  # the run's own steps: 2 s each on its clock, as hour's timing said
    calls = []

    def timed(fn, steps):  # a training step: short's first (1 s), then hour's (2 s); evaluation free
        calls.append(steps)
        return 0.0 if steps == 4 else float(calls.count(8))
    monkeypatch.setattr(budget, "seconds_each", timed)

    def run(minutes, name):
        flags = base_args(tiny_data, tmp_path / name, "--model", "res", "--minutes", minutes, "--amp", "off",
                          "--no-channels-last", "--batch-size", "16")
        del flags[flags.index("--epochs"):flags.index("--epochs") + 2]
        calls.clear()
        rc, out, err = run_main(flags)
        assert rc == 0, err
        return out, json.load(open(tmp_path / name / "runs" / "r" / "config.json"))

    out, cfg = run("0.8", "fits")
    # short: (48 x 0.92 - 20) / 1 = 24 epochs; hour: (44.16 - 20) / 2 = 12; after its first epoch (2 s):
    # 1 + (48 - 2 - 20) x 0.95 / 2 = 13
    assert calls == [8, 4, 8, 4] and "--minutes 0.8: --preset hour (the best single model) takes ~2 s an epoch " \
        "here: 12 of its epochs fit, so the run trains it instead" in out
    assert (cfg["preset"], cfg["full_res_width"], cfg["tta_views"], cfg["epochs"]) == ("hour", 64, "flip_shift", 13)
    weights = torch.load(tmp_path / "fits" / "runs" / "r" / "last.pth", weights_only=True)["state_dict"]
    import models
    assert all(v.shape == weights[k].shape for k, v in models.build_model("res", 64).state_dict().items())
    out, cfg = run("0.55", "short")  # short: (30.36 - 20) / 1 = 10 epochs; hour: (30.36 - 20) / 2 = 5
    assert calls == [8, 4, 8, 4] and "5 of its epochs fit, fewer than 7, so the run keeps --preset short" in out
    assert (cfg["preset"], cfg["full_res_width"]) == ("short", None)
    out, cfg = run("0.42", "shorter")  # short: (23.18 - 20) / 1 = 3 epochs
    assert calls == [8, 4] and "--preset hour" not in out and (cfg["preset"], cfg["full_res_width"]) == ("short", None)
