"""The users' own machines: a GTX 1650's code path (fp16 autocast + GradScaler + Muon) run on the CPU, a run
resumed in another precision or on another machine, and --amp auto / --channels-last auto choosing by timing.

fp16 on a CPU is emulated and slow (a ThreeCNN step at batch 8 of 100x100 images takes ~10-20 s on 2 cores), so
the step itself is tested on a small convolutional model and small images, and whole runs in fp16 take one step
an epoch."""
import copy
import csv
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import budget
import dataloader
from engine import demo_data
import main
from engine import optim
from engine import recipes
from engine import runtime
from engine import state as run_state
from engine import train
from engine import trainstep
from conftest import base_args

CPU = torch.device("cpu")


class Small(nn.Module):
    """A convolution (stepped by Muon), BatchNorm and a classifier (stepped by AdamW): ResCNN's kinds of layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def short_cfg(**change):
    """--model res's settings (--preset short: Muon, the per-step linear schedule) in fp16, with the changes."""
    cfg = recipes.resolve_config(main.parse_args(["--model", "res", "--amp", "fp16"]))[0]
    return {**cfg, **change}


def small_state(amp=torch.float16, **change):
    torch.manual_seed(0)
    return run_state.build(short_cfg(**change), Small(), CPU, amp, False, steps_per_epoch=20, compile=False,
                                 ddp=False)


def batch(n=16, seed=0):
    """Images whose class is told by the mean of one colour channel: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 5
    x = torch.randn(n, 3, 8, 8, generator=g) * 0.5
    x[:, 0] += (y.float() - 2)[:, None, None]
    return x, y


def test_fp16_with_its_grad_scaler_and_muon_steps_and_learns():
    s = small_state(ema=0.9, lr=0.03, warmup=0, label_smoothing=0.0)
    assert isinstance(s.opt, optim.MuonAdamW) and s.scaler.is_enabled()
    x, y = batch()
    start = s.raw.conv.weight.detach().clone()
    losses = [trainstep.step(s, x, y)[0].item() for _ in range(40)]
    trainstep.follow_steps_taken(s)
    taken = s.ema.n_averaged.item()
    assert taken >= 35 and s.sched.last_epoch == taken  # a few steps may be skipped while the scale settles
    assert s.scaler.get_scale() > 1 and not (s.raw.conv.weight == start).all()  # Muon moved the convolution
    assert max(losses[-5:]) < 0.5 * losses[0]  # it learns


def test_a_step_whose_fp16_gradients_overflow_leaves_weights_schedule_and_ema_where_they_were():
    s = small_state(ema=0.9)
    x, y = batch()
    for _ in range(3):
        trainstep.step(s, x, y)
    trainstep.follow_steps_taken(s)
    weights, ema = copy.deepcopy(s.raw.state_dict()), copy.deepcopy(s.ema.module.state_dict())
    n, lr, scale, sched = s.ema.n_averaged.item(), s.opt.param_groups[0]["lr"], s.scaler.get_scale(), s.sched.last_epoch
    hook = s.raw.conv.weight.register_hook(lambda g: g * float("inf"))  # the scaled gradient overflows
    trainstep.step(s, x, y)
    hook.remove()
    assert s.skipped.item() == 1
    trainstep.follow_steps_taken(s)
    assert s.scaler.get_scale() == scale / 2  # backed off
    assert all(torch.equal(p, weights[k]) for k, p in s.raw.named_parameters())  # (BatchNorm's statistics: the
    # forward's, as in any skipped step)
    assert all(torch.equal(v, s.ema.module.state_dict()[k]) for k, v in ema.items())
    assert s.ema.n_averaged.item() == n and s.sched.last_epoch == sched and s.opt.param_groups[0]["lr"] == lr
    trainstep.step(s, x, y)  # the next good step goes on from there
    trainstep.follow_steps_taken(s)
    assert s.ema.n_averaged.item() == n + 1 and s.sched.last_epoch == sched + 1


def test_a_skipped_step_is_counted_on_the_device_without_reading_it_on_the_host(monkeypatch):
    """No host sync per step: neither the skip check nor the EMA reads a tensor's value (the loop reads the count
    every 50 steps, with its loss check)."""
    s = small_state(ema=0.9, scheduler="linear")
    x, y = batch()
    trainstep.step(s, x, y)
    reads = []
    for name in ("item", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _real=real, _n=name: (reads.append(_n), _real(t, *a))[1])
    s.scaler = torch.amp.GradScaler("cpu", enabled=False)  # the library's GradScaler.step reads found_inf itself
    s.amp = torch.bfloat16
    trainstep.step(s, x, y)
    monkeypatch.undo()
    assert reads == []


def test_muon_momentum_is_read_right_when_a_run_resumes_in_the_other_layout():
    """--channels-last auto may choose the other layout on another machine: Muon's momentum (a matrix view of each
    convolution in its memory order) is saved in one order and read back in the new one."""
    x, y = batch()
    torch.manual_seed(0)
    nchw = Small()
    cl = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    states = {}
    for name, model in (("nchw", nchw), ("cl", cl)):
        opt = optim.make_optimizer(model.parameters(), 1e-2, 0.0, "muon")
        inp = x.contiguous(memory_format=torch.channels_last) if name == "cl" else x
        F.cross_entropy(model(inp), y).backward()
        opt.step()
        states[name] = opt
    fresh = optim.make_optimizer(copy.deepcopy(nchw).parameters(), 1e-2, 0.0, "muon")
    fresh.load_state_dict(states["cl"].state_dict())  # saved channels_last, resumed NCHW
    got = fresh.muon.state_dict()["state"][0]["momentum_buffer"]
    want = states["nchw"].muon.state_dict()["state"][0]["momentum_buffer"]
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)


def test_the_minutes_trial_steps_a_state_of_its_own_and_leaves_the_runs_scaler(monkeypatch):
    """--minutes times the run's own step, input included, on a copy: the run's GradScaler, weights and random
    state are as they were, also in fp16 where the trial's steps move its scaler."""
    s = small_state()
    images = torch.randint(0, 255, (20, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(20) % 5
    tr = dataloader.TensorBatches(images, labels, None, 4, True, CPU, max_angle=0)
    va = dataloader.TensorBatches(images, labels, None, 4, False, CPU)
    s.cfg = {**s.cfg, "minutes": 1.0}
    run = train.Run(s, tr, va, None, va, run_dir="unused")
    trial_scales, trial_steps = [], []
    real_step = trainstep.step

    def step(state, x, y):
        trial_steps.append(state is not run.state and x.dtype == torch.float32)
        out = real_step(state, x, y)
        trial_scales.append(state.scaler)
        return out
    monkeypatch.setattr(trainstep, "step", step)
    monkeypatch.setattr(budget, "seconds_each", lambda fn, n: [fn() for _ in range(3)] and 0.01)
    scaler, weights, rng = s.scaler.state_dict(), copy.deepcopy(s.raw.state_dict()), torch.get_rng_state()
    budget.size_epochs(run, started=0.0)
    assert trial_steps and all(trial_steps) and all(sc is not s.scaler for sc in trial_scales)
    assert s.scaler.state_dict() == scaler and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, s.raw.state_dict()[k]) for k, v in weights.items())


# ----------------------------------------------------------------------------------------------
# --amp auto, --channels-last auto

def fake_timings(seconds):
    def time_candidates(cfg, raw, batches, device, candidates):
        return {c: seconds[c] for c in candidates}
    return time_candidates


# A training step's seconds as a bf16 CPU times them (ResCNN at batch 64). Faked wherever a test needs the CPU's own
# choice: timed for real, a tiny model's steps are noise, and on a busy machine fp32 may win.
CPU_TIMINGS = {("bf16", False): 0.14, ("bf16", True): 0.11, ("off", False): 0.63, ("off", True): 0.28}


def test_auto_takes_the_fastest_candidate_says_so_and_saves_it(tiny_data, tmp_path, run_main, monkeypatch):
    """On a bf16 CPU bf16 wins (timings faked as measured there); the choice and its timings are printed in one line
    and saved with the run, and a resume on the same machine keeps it without timing again."""
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(budget, "time_candidates", fake_timings(CPU_TIMINGS))
    rc, out, err = run_main(base_args(tiny_data, tmp_path, "--epochs", "1"))
    assert rc == 0, err
    line = next(l for l in out.splitlines() if l.startswith("--amp / --channels-last auto:"))
    assert "bf16 NCHW 0.14 s" in line and "fp32 channels_last 0.28 s" in line
    assert line.endswith("training in bf16 channels_last (saved with the run)")
    assert "precision bfloat16 channels_last" in out
    chosen = torch.load(tmp_path / "runs" / "r" / "last.pth", weights_only=True)["config"]["chosen"]
    assert chosen["amp"] == "bf16" and chosen["channels_last"] is True and chosen["on"] == runtime.machine(CPU)
    assert json.load(open(tmp_path / "runs" / "r" / "config.json"))["chosen"] == chosen
    monkeypatch.setattr(budget, "time_candidates", lambda *a: pytest.fail("timed again on the same machine"))
    rc, out, err = run_main(["--resume", tmp_path / "runs" / "r", "--epochs", "2", "--quiet"])
    assert rc == 0, err
    assert "precision bfloat16 channels_last" in out and "goes on in" not in out


def test_auto_on_a_cpu_without_native_bf16_times_fp32_only(tiny_data, tmp_path, run_main, monkeypatch):
    """An AVX2 laptop: the library says bf16 is not native, so only fp32's two layouts are timed."""
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    seen = []
    monkeypatch.setattr(budget, "time_candidates", lambda cfg, raw, b, d, cands: seen.extend(cands) or
                        {("off", False): 0.5, ("off", True): 0.7})
    rc, out, err = run_main(base_args(tiny_data, tmp_path, "--epochs", "1"))
    assert rc == 0, err
    assert seen == [("off", False), ("off", True)] and "training in fp32 NCHW" in out and "precision fp32," in out


def test_auto_times_real_steps_of_each_candidate(tiny_data):
    """No fake: the timing steps copies of the model in each candidate, and leaves the model as it was."""
    import models
    cfg = recipes.resolve_config(main.parse_args(["--model", "three", "--batch-size", "4"]))[0]
    tr = dataloader.loaders_for({**cfg, "data_dir": tiny_data, "cache_dir": None, "quiet": True}, CPU, ["train"],
                                "train")["train"]
    raw = models.build_model("three")
    before = copy.deepcopy(raw.state_dict())
    seconds = budget.time_candidates(cfg, raw, tr, CPU, [("off", False), ("bf16", True)])
    assert set(seconds) == {("off", False), ("bf16", True)} and all(0 < v < 60 for v in seconds.values())
    assert all(torch.equal(v, raw.state_dict()[k]) for k, v in before.items())


def test_auto_on_a_gpu_leaves_each_candidates_kernel_search_untimed(monkeypatch):
    """On a GPU a candidate's first step also runs cuDNN's kernel search (seconds, where its steps take
    milliseconds): timed, it made the first candidate win every time (seen on an H200). Faked here as a GPU does
    it: each candidate's first step takes 5 s, its later ones their own time; the fastest later one is chosen."""
    steady = {(torch.bfloat16, False): 0.05, (torch.bfloat16, True): 0.04, (torch.float16, False): 0.06}

    class Trial:
        def __init__(self, dtype, cl):
            self.key, self.steps = (dtype, cl), 0

    class Batches:
        def __len__(self):
            return 1

        def plan(self, gen):
            return None

        def batches(self, plan, gen):
            return iter([(None, None, None)])

    def step(trial, x, y):
        trial.steps += 1
        return 5.0 if trial.steps == 1 else steady[trial.key]

    monkeypatch.setattr(budget, "build", lambda cfg, raw, device, dtype, cl, *a, **k: Trial(dtype, cl))
    monkeypatch.setattr(budget.trainstep, "step", step)
    monkeypatch.setattr(budget, "timed_step", step)
    candidates = [("bf16", False), ("bf16", True), ("fp16", False)]
    seconds = budget.time_candidates({}, torch.nn.Linear(1, 1), Batches(), torch.device("cuda"), candidates)
    assert seconds == {("bf16", False): 0.05, ("bf16", True): 0.04, ("fp16", False): 0.06}


# ----------------------------------------------------------------------------------------------
# Resuming in another precision, or on another machine

@pytest.fixture(scope="module")
def one_step_data(tmp_path_factory):
    """One training step an epoch (4 images, batch 4): fp16 is emulated on a CPU, a step takes seconds."""
    return demo_data.build(str(tmp_path_factory.mktemp("one")), {"train": 4, "validation": 2, "test": 1}, seed=2)


def args(data, tmp_path, name, *extra):
    a = base_args(data, tmp_path, "--batch-size", "4", "--no-channels-last", "--deterministic", *extra)
    a[a.index("--run-name") + 1] = name
    return a


def last(tmp_path, name):
    return torch.load(tmp_path / "runs" / name / "last.pth", weights_only=True)


def resume(run_main, tmp_path, name, *extra):
    return run_main(["--resume", tmp_path / "runs" / name, "--quiet", *extra])


def test_fp16_resumes_exactly_with_its_scaler_then_goes_on_in_fp32(one_step_data, tmp_path, run_main):
    """fp16 asked for on a CPU says what it costs; stopped after epoch 1 and resumed it is the run that never
    stopped, its GradScaler included; --amp off given on resume then trains in fp32 from there, and says so."""
    rc, out, err = run_main(args(one_step_data, tmp_path, "a", "--amp", "fp16", "--epochs", "1"))
    assert rc == 0, err
    assert out.count("--amp fp16 on a CPU runs a GTX 1650's code path") == 1 and "not for training" in out  # its cost
    assert resume(run_main, tmp_path, "a", "--epochs", "2")[0] == 0
    assert run_main(args(one_step_data, tmp_path, "b", "--amp", "fp16", "--epochs", "2"))[0] == 0
    a, b = last(tmp_path, "a"), last(tmp_path, "b")
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] > 1
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())
    assert a["skipped"] == b["skipped"] == 0
    rc, out, err = resume(run_main, tmp_path, "a", "--epochs", "3", "--amp", "off")
    assert rc == 0, err
    assert "this run trained in fp16 + GradScaler NCHW on" in out and "it goes on in fp32 NCHW" in out
    assert "bit for bit only in the precision it was saved in" in out and "precision fp32" in out
    after = last(tmp_path, "a")
    assert after["epoch"] == 3 and after["scaler"] == {} and after["config"]["chosen"]["amp"] == "off"
    assert not torch.equal(after["state_dict"]["features.0.weight"], a["state_dict"]["features.0.weight"])


def test_bf16_goes_on_in_fp16_with_a_fresh_scaler_and_fp32_goes_on_in_bf16(one_step_data, tmp_path, run_main):
    assert run_main(args(one_step_data, tmp_path, "c", "--amp", "bf16", "--epochs", "1"))[0] == 0
    assert last(tmp_path, "c")["scaler"] == {}  # what a bf16 run saves: nothing
    rc, out, err = resume(run_main, tmp_path, "c", "--epochs", "2", "--amp", "fp16")
    assert rc == 0 and "Traceback" not in err, err
    assert "the scaler starts afresh" in out and "it goes on in fp16 + GradScaler NCHW" in out
    c = last(tmp_path, "c")
    assert c["epoch"] == 2 and c["scaler"]["scale"] > 1 and c["config"]["amp"] == "fp16"
    log = list(csv.DictReader(open(tmp_path / "runs" / "c" / "log.csv")))
    assert len(log) == 2 and all(0 < float(r["train_loss"]) < 10 for r in log)
    assert run_main(args(one_step_data, tmp_path, "d", "--amp", "off", "--epochs", "1"))[0] == 0
    rc, out, err = resume(run_main, tmp_path, "d", "--epochs", "2", "--amp", "bf16")
    assert rc == 0 and "it goes on in bf16 NCHW" in out and "precision bfloat16" in out, err


def test_a_cpu_run_resumed_on_a_gpu_that_chooses_fp16_starts_a_fresh_scaler(one_step_data, tmp_path, run_main,
                                                                          monkeypatch):
    """Begun on a bf16 CPU (an empty GradScaler state saved), resumed where --amp auto chooses fp16 (a GTX 1650,
    faked: its name, its native precisions and its timings): it goes on in fp16, no traceback."""
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(budget, "time_candidates", fake_timings(CPU_TIMINGS))
    assert run_main(args(one_step_data, tmp_path, "e", "--epochs", "1"))[0] == 0
    assert last(tmp_path, "e")["config"]["chosen"]["amp"] == "bf16"
    gpu = "NVIDIA GeForce GTX 1650 (compute capability 7.5)"
    monkeypatch.setattr(runtime, "machine", lambda device: gpu)
    monkeypatch.setattr(runtime, "native_precisions", lambda device: ["fp16", "off"])
    monkeypatch.setattr(budget, "time_candidates", fake_timings({("fp16", False): 0.03, ("off", False): 0.05}))
    rc, out, err = resume(run_main, tmp_path, "e", "--epochs", "2")
    assert rc == 0 and "Traceback" not in err, err
    assert f"it goes on in fp16 + GradScaler NCHW on {gpu}" in out and "the scaler starts afresh" in out
    e = last(tmp_path, "e")
    assert e["config"]["chosen"]["on"] == gpu and e["scaler"]["scale"] > 1 and e["epoch"] == 2


def test_a_gpu_fp16_run_resumed_on_a_cpu_goes_on_in_the_cpus_own_precision(one_step_data, tmp_path, run_main,
                                                                         monkeypatch):
    """--amp fp16 (as on a GTX 1650) resumed on a CPU, which only emulates fp16: it says so and goes on as --amp
    auto chooses there (bf16), not silently in fp16 at a hundred times the cost; --amp fp16 given again keeps it."""
    gpu = "NVIDIA GeForce GTX 1650 (compute capability 7.5)"
    with monkeypatch.context() as m:
        m.setattr(runtime, "machine", lambda device: gpu)
        m.setattr(runtime, "native_precisions", lambda device: ["fp16", "off"])
        assert run_main(args(one_step_data, tmp_path, "f", "--amp", "fp16", "--epochs", "1"))[0] == 0
    assert last(tmp_path, "f")["scaler"]["scale"] > 1
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(budget, "time_candidates", fake_timings(CPU_TIMINGS))
    rc, out, err = resume(run_main, tmp_path, "f", "--epochs", "2")
    assert rc == 0, err
    assert "was given --amp fp16, which CPU" in out and "goes on as --amp auto chooses" in out
    assert "it goes on in bf16" in out and "precision bfloat16" in out
    f = last(tmp_path, "f")
    assert f["config"]["amp"] == "auto" and f["config"]["chosen"]["amp"] == "bf16"


def test_a_precision_the_gpu_cannot_run_is_one_line(monkeypatch):
    from engine.errors import UserError
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Old GPU")
    with pytest.raises(UserError, match="--amp bf16: Old GPU cannot compute in bf16: use --amp auto"):
        runtime.check_precision("bf16", torch.device("cuda"))


# ----------------------------------------------------------------------------------------------
# Muon's Newton-Schulz in fp32 where bf16 is emulated

def test_our_newton_schulz_is_the_librarys_bit_for_bit_in_bf16():
    from torch.optim._muon import _zeropower_via_newtonschulz
    for shape in ((32, 27), (64, 288), (300, 20)):
        g = torch.randn(*shape)
        assert torch.equal(optim.newton_schulz(g, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.bfloat16),
                           _zeropower_via_newtonschulz(g, (3.4445, -4.775, 2.0315), 5, 1e-7))


def test_muon_runs_its_iterations_in_fp32_where_bf16_is_not_native(monkeypatch):
    """On an AVX2 CPU or a GTX 1650 (native precisions faked) the convolutions step as torch's Muon steps them,
    up to bf16's rounding of its update, with the iterations in fp32; with native bf16, torch's own Muon runs."""
    torch.manual_seed(0)
    model = Small()
    assert type(optim.make_optimizer(model.parameters(), 1e-2, 0.1, "muon").muon) is torch.optim.Muon
    monkeypatch.setattr(runtime, "native_precisions", lambda device: ["off"])
    ours = optim.make_optimizer(model.parameters(), 1e-2, 0.1, "muon")
    assert type(ours.muon) is optim.MuonFP32
    twin = copy.deepcopy(model.conv.weight.detach()).view(8, -1).requires_grad_()
    library = torch.optim.Muon([twin], lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    x, y = batch()
    start = model.conv.weight.detach().clone()
    for _ in range(3):
        F.cross_entropy(model(x), y).backward()
        twin.grad = model.conv.weight.grad.view(8, -1).clone()
        ours.step()
        library.step()
        ours.zero_grad()
    moved, diff = (model.conv.weight - start).abs().max(), (model.conv.weight.view(8, -1) - twin).abs().max()
    assert moved > 1e-3 and 0 < diff < 0.1 * moved  # the same steps, but for bf16's rounding of the update


def test_native_bf16_on_a_cpu_is_what_the_library_says_not_proc_cpuinfo():
    """Limited to AVX2 by oneDNN's own switch (as on a laptop) the CPU has no native bf16, whatever
    /proc/cpuinfo lists; the check reads no file, so macOS and Windows get the same answer."""
    import os
    import subprocess
    import sys
    from conftest import ROOT
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", "import torch; from engine import runtime; print(runtime.cpu_has_bf16(), "
                          "runtime.native_precisions(torch.device('cpu')))"], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert out.stdout.split() == ["False", "['off']"], out.stderr
