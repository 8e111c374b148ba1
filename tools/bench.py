"""Benchmark: the report's per-image path against the fast path, in one process, alternating the two.

    python -m tools.bench                      demo data, every model (builds demo_data/ if absent)
    python -m tools.bench --data-dir dataset   the real data
    python -m tools.bench --quick              a short check (< 60 s on 2 CPU cores: ThreeCNN; on a GPU also SkipConCNN)
    python -m tools.bench --json out.json      also write the figures as JSON
    python -m tools.bench --memory             only the GPU memory each preset and model needs (tools/gpu_memory.py)
    python -m tools.bench --muon               --model res's training step in bf16 and fp32, and Muon's Newton-Schulz
                                         part of it in bf16 (as torch.optim.Muon runs it) and in fp32 (~1 min)
    python -m tools.bench --widths 32,48,64    --model res's step at each --full-res-width, in turn (~1 min)
    python -m tools.bench --compile            the fast path's model compiled, as main.py --compile (CUDA graphs on a GPU)

baseline: Pillow decodes each image every time, torchvision transforms it, DataLoader workers batch it;
          fp32, NCHW, PyTorch's default Adam, the report's batch size (as the report's code does).
fast:     the split decoded once into a uint8 tensor on the device, whole batches augmented there,
          bf16 or fp16 (the first --amp auto candidate), channels_last, main.py's own training step with the
          model's recipe (trainstep.py: fused Adam for the report's models); inference under inference_mode at
          main.py's evaluation batch (on a GPU 256 for ThreeCNN, 64 for the others; 16 on a CPU).
Stages: input (images/s out of the loader), train (data + step, per model), infer (per model).
Rounds alternate baseline and fast so that machine drift hits both; the median round is reported.
On CUDA it adds achieved TFLOP/s, MFU (FLOPs from torch.utils.flop_counter) and peak memory.
"""
import argparse
import gc
import json
import statistics
import time

import torch
import torch.utils.benchmark
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from engine import budget
import dataloader
from engine import demo_data
import main
import models
from engine import optim
from engine import recipes
from engine import runtime
from engine import trainstep
from engine import whiten
from engine.state import build
from tools import gpu_memory

# Dense bf16/fp16 tensor-core peak (TFLOP/s) by device name; --peak-tflops overrides.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "RTX 4090": 165.0, "GTX 1650": 6.0}


def forever(loader, gen):
    while True:
        yield from loader.batches(loader.plan(gen), gen)


def timed(it, steps, warmup, device):
    """images/s over `steps` items of `it`, after `warmup` items (worker start-up, cuDNN autotuning)."""
    for _ in range(warmup):
        next(it)
    runtime.sync(device)
    t, n = time.perf_counter(), 0
    for _ in range(steps):
        n += next(it)
    runtime.sync(device)
    return n / (time.perf_counter() - t)


def input_steps(loader, gen):
    for x, _, _ in forever(loader, gen):
        yield len(x)


def baseline_steps(model, loader, gen):
    """Training steps as the report's code takes them: fp32, NCHW, PyTorch's default Adam, plain cross-entropy."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for x, y, _ in forever(loader, gen):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        yield len(x)


def run_steps(state, loader, gen):
    """Training steps as main.py takes them: its own step on a state built as a run's (state.py, trainstep.py)."""
    state.raw.train()
    for x, y, _ in forever(loader, gen):
        trainstep.step(state, x, y)
        yield len(x)


def run_state(name, model, device, amp, steps_per_epoch, compile=False, channels_last=True):
    """The training state main.py builds for --model name with its own recipe (channels_last unless told)."""
    cfg = recipes.resolve_config(main.parse_args(["--model", name]))[0]
    if cfg["whiten"]:  # frozen, as the run trains it (its filters do not change the time)
        whiten.whiten_first_conv(model)
    return build(cfg, model, device, amp, channels_last, steps_per_epoch, compile=compile, ddp=False)


def infer_steps(model, loader, amp, channels_last, device):
    model.eval()
    for x, _, _ in forever(loader, None):
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            model(x)
        yield len(x)


def flops_per_image(model, device, train):
    x = torch.randn(2, 3, 100, 100, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        if train:
            model.train()
            F.cross_entropy(model(x), torch.zeros(2, dtype=torch.long, device=device)).backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model.eval()(x)
    return counter.get_total_flops() / 2


# ----------------------------------------------------------------------------------------------
# Muon's Newton-Schulz: its share of a step, in bf16 and in fp32

def seconds_per_call(fn, calls):
    """torch.utils.benchmark.Timer's mean seconds per call of fn over `calls` calls, after its 2 untimed ones; it
    waits for a GPU to finish, and runs on this process's threads (its default is one)."""
    timer = torch.utils.benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(calls).mean


def res_batch(device):
    """A batch of random images and labels of --model res's size under its own recipe (64)."""
    batch = recipes.resolve_config(main.parse_args(["--model", "res"]))[0]["batch_size"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 100, 100, generator=gen, device=device)
    return x, torch.randint(0, recipes.NUM_CLASSES, (batch,), generator=gen).to(device)


def muon_share(device, rounds=3):
    """Seconds of --model res's training step (--preset short: Muon, batch 64) in bf16 and in fp32, NCHW and
    channels_last (Muon's iterations in fp32 where bf16 is not native, optim.MuonFP32), and of the Newton-Schulz
    iterations over its convolutions' matrices in bf16 (as torch.optim.Muon runs them) and in fp32: the mean of
    `rounds` calls each after 2 untimed ones (torch.utils.benchmark.Timer), all in one process."""
    name = "res"
    x, y = res_batch(device)
    out = {}
    for amp in ("bf16", "off"):
        for cl in (False, True):
            state = run_state(name, models.build_model(name).to(device), device, runtime.DTYPES[amp], 100,
                              channels_last=cl)
            out[f"step {budget.describe(amp, cl)}"] = seconds_per_call(
                lambda: trainstep.step(state, x, y), rounds)
    matrices = [optim.as_matrix(p.detach(), False) for p in models.build_model(name).to(device).parameters()
                if p.ndim == 4]
    for label, dtype in (("Newton-Schulz bf16", torch.bfloat16), ("Newton-Schulz fp32", torch.float32)):
        out[label] = seconds_per_call(lambda: [optim.newton_schulz(m, (3.4445, -4.775, 2.0315), 5, 1e-7, dtype)
                                               for m in matrices], rounds)
    step = {k: v for k, v in out.items() if k.startswith("step")}
    for k, v in out.items():
        print(f"  {k:<32} {v * 1000:9.1f} ms")
    for amp in ("bf16", "fp32"):
        best = min(v for k, v in step.items() if f" {amp} " in k)
        print(f"  Newton-Schulz in bf16 / in fp32 against the fastest {amp} step: "
              f"{100 * out['Newton-Schulz bf16'] / best:.1f}% / {100 * out['Newton-Schulz fp32'] / best:.1f}%")
    return out


# ----------------------------------------------------------------------------------------------
# ResCNN's width at full resolution: what each costs a step

def width_costs(device, amp, widths, rounds=3):
    """Seconds of --model res's training step (its recipe: --preset short, batch 64, channels_last, `amp`) for each
    --full-res-width, the widths taken in turn in each of `rounds` rounds so that drift of the machine hits all
    alike, the median round shown; with the FLOPs of a training step per image, and both against the first width."""
    x, y = res_batch(device)
    states = {w: run_state("res", models.build_model("res", w).to(device), device, amp, 100) for w in widths}
    flops = {w: flops_per_image(state.raw, device, True) for w, state in states.items()}  # the models timed (whitened)
    times = {w: [] for w in widths}
    for _ in range(rounds):
        for w, state in states.items():
            times[w].append(seconds_per_call(lambda: trainstep.step(state, x, y), 2))
    step = {w: statistics.median(t) for w, t in times.items()}
    first = widths[0]
    for w in widths:
        print(f"  width {w:>4}: step {step[w] * 1000:8.1f} ms ({step[w] / step[first]:.2f}x)   "
              f"{flops[w] / 1e9:5.2f} GFLOP an image ({flops[w] / flops[first]:.2f}x)   "
              f"{models.count_params(states[w].raw, True):>10,} trainable parameters")
    return step, flops


def bench_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=recipes.DEMO_DIR)
    p.add_argument("--models", default=None, help="comma list (default: three,skip,ensemble,res)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    p.add_argument("--workers", type=int, default=recipes.DEFAULTS["workers"], help="baseline DataLoader workers "
                   "(the report's 4, at most one per core)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="train and inference batch of both paths "
                   "(default: the report's batch to train, main.py's evaluation batch to infer on the fast path)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--memory", action="store_true", help="only the GPU memory table (seconds, no GPU needed)")
    p.add_argument("--muon", action="store_true", help="only Muon's Newton-Schulz share of --model res's step")
    p.add_argument("--widths", default=None, help="only --model res's step at each of these --full-res-width values "
                   "(comma list, such as 32,48,64)")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path's model as main.py --compile "
                   "does (on one GPU with CUDA graphs); the first steps, which compile, are not timed")
    return p


class Bench:
    """The two paths measured side by side, in alternating rounds (drift hits both); one row per stage."""

    def __init__(self, a, device, amp, rounds, peak):
        self.a, self.device, self.amp, self.rounds, self.peak = a, device, amp, rounds, peak
        self.cpu, self.rows = device.type == "cpu", []
        self.gen = torch.Generator().manual_seed(0)

    def loaders(self, batch, train, kind):
        a = self.a
        return dataloader.make_batches(a.data_dir, "train", batch, train, self.device, loader=kind,
                                       cache_dir=a.cache_dir, workers=a.workers, log=lambda *m: None)

    def steps_for(self, name, stage):  # fewer steps for the heavy models on a CPU
        heavy, quick = name in ("skip", "ensemble"), self.a.quick
        if stage == "input":
            return 40 if quick else 150
        if self.cpu:
            return (1 if quick else 3) if heavy else (8 if quick else 30)
        return 30 if heavy else 200

    def measure(self, stage, name, make_baseline, make_fast, batch_b, batch_f, extra=None):
        device, res, mem = self.device, {"baseline": [], "fast": []}, {}
        for _ in range(self.rounds):
            for variant, make in (("baseline", make_baseline), ("fast", make_fast)):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                # The fast input pipeline takes ~1 ms a batch: 5x the steps, so its figure is not one of 30 ms.
                steps = self.steps_for(name, stage) * (5 if stage == "input" and variant == "fast" else 1)
                # Warm-up: worker start-up and cuDNN's autotuning; compiling, and CUDA graphs' recording, take 3.
                warmup = 2 if stage == "input" else 3 if self.a.compile and variant == "fast" else 1
                res[variant].append(timed(make(), steps, warmup, device))
                if device.type == "cuda":  # the highest of the rounds: a compiled model allocates its CUDA
                    # graphs' memory while recording them (round 1) and replays it unseen by these counters
                    mem[variant] = max(mem.get(variant, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
        row = {"stage": stage, "model": name, "baseline_img_s": statistics.median(res["baseline"]),
               "fast_img_s": statistics.median(res["fast"]), "baseline_batch": batch_b, "fast_batch": batch_f}
        row["ratio"] = row["fast_img_s"] / row["baseline_img_s"]
        if extra:
            row.update(extra(row))
        if mem:
            row.update(baseline_peak_mib=mem["baseline"], fast_peak_mib=mem["fast"])
        self.rows.append(row)
        print(f"{stage:<6} {name:<9} baseline {row['baseline_img_s']:9.1f} img/s   fast {row['fast_img_s']:9.1f} img/s"
              f"   x{row['ratio']:6.2f}" + "".join(f"   {k} {v:.3g}" for k, v in row.items() if k.endswith(("tflops", "mfu", "mib"))))

    def flops_extra(self, model, train):
        fpi = flops_per_image(model, self.device, train)

        def extra(row):
            out = {"gflop_per_image": fpi / 1e9, "fast_tflops": fpi * row["fast_img_s"] / 1e12}
            if self.peak:
                out["fast_mfu"] = out["fast_tflops"] / self.peak
            return out
        return extra

    def input_rows(self):
        """The report's train loader against the decoded tensor with batched augmentation."""
        slow_in, fast_in = self.loaders(16, True, "images"), self.loaders(16, True, "tensors")
        self.measure("input", "-", lambda: input_steps(slow_in, self.gen), lambda: input_steps(fast_in, self.gen), 16, 16)

    def model_rows(self, name):
        a, device, amp, gen = self.a, self.device, self.amp, self.gen
        batch = a.batch_size or recipes.RECIPES[name]["batch_size"]
        base_model = models.build_model(name).to(device)  # the ensemble with untrained bases: same cost
        slow_tr, fast_tr = self.loaders(batch, True, "images"), self.loaders(batch, True, "tensors")
        state = run_state(name, models.build_model(name).to(device), device, amp, len(fast_tr), a.compile)
        fast_model, fast_run = state.raw, state.model  # channels_last, and compiled as --compile does; FLOPs: on raw
        self.measure("train", name, lambda: baseline_steps(base_model, slow_tr, gen), lambda: run_steps(state, fast_tr, gen),
                     batch, batch, self.flops_extra(fast_model, True))
        eval_batch = a.batch_size or dataloader.eval_batch_size({**recipes.DEFAULTS, "model": name}, device)
        slow_ev, fast_ev = self.loaders(batch, False, "images"), self.loaders(eval_batch, False, "tensors")
        self.measure("infer", name, lambda: infer_steps(base_model, slow_ev, None, False, device),
                     lambda: infer_steps(fast_run, fast_ev, amp, True, device), batch, eval_batch,
                     self.flops_extra(fast_model, False))


def main_bench(argv=None):
    a = bench_parser().parse_args(argv)
    all_models = a.models.split(",") if a.models else gpu_memory.MODELS
    if a.memory:
        return gpu_memory.memory_table(all_models)
    device = torch.device(a.device)
    amp = runtime.amp_dtype({"amp": a.amp}, device)
    if a.muon:
        print(f"device: {runtime.machine(device)}; --model res, --preset short, batch 64")
        return muon_share(device)
    if a.widths:
        print(f"device: {runtime.machine(device)}; --model res, --preset short, batch 64, {runtime.dtype_name(amp)} "
              f"channels_last; {a.rounds or 3} rounds, median shown")
        return width_costs(device, amp, [int(w) for w in a.widths.split(",")], a.rounds or 3)
    if a.data_dir == recipes.DEMO_DIR:
        demo_data.ensure(recipes.DEMO_DIR)
    torch.backends.cudnn.benchmark = True
    # --quick on a CPU measures ThreeCNN only: one SkipConCNN step there takes seconds.
    cpu = device.type == "cpu"
    names = (a.models or ("three" if a.quick and cpu else "three,skip" if a.quick else "three,skip,ensemble,res")).split(",")
    rounds = a.rounds or (2 if a.quick else 3)
    peak = a.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if device.type == "cuda"
                                  and k in torch.cuda.get_device_name(device)), None)
    dev_name = runtime.device_name(device)
    print(f"device: {dev_name}; fast path precision: {runtime.dtype_name(amp)}"
          f"{', compiled' if a.compile else ''}; {rounds} alternating rounds, median shown")
    bench = Bench(a, device, amp, rounds, peak)
    bench.input_rows()
    for name in names:
        bench.model_rows(name)
    memory = gpu_memory.memory_table(all_models)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": dev_name, "data_dir": a.data_dir, "quick": a.quick, "rounds": rounds,
                       "fast_precision": str(amp), "compiled": a.compile, "peak_tflops": peak, "rows": bench.rows,
                       "memory": memory}, f, indent=2)
        print(f"wrote {a.json}")
    return bench.rows


if __name__ == "__main__":
    main_bench()
    gc.freeze()  # exit without the interpreter's last garbage collections over PyTorch's objects (see main.py)
