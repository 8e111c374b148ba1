"""tools/bench.py: its JSON, the compiled path it times; tools/gpu_memory.py: the memory count without a GPU and the
4 GB card."""
import json

import pytest
import torch

from tools import bench
from tools import gpu_memory
from engine import recipes


def test_bench_writes_the_documented_json_at_the_batch_size_given_to_both_paths(tiny_data, tmp_path, monkeypatch):
    """...and its fast path trains with main.py's own step (trainstep.step): 1 warm-up step and 8 timed."""
    from engine import trainstep
    calls, real = [], trainstep.step
    monkeypatch.setattr(trainstep, "step", lambda s, x, y: calls.append((len(x), s.channels_last)) or real(s, x, y))
    out = tmp_path / "b.json"
    rows = bench.main_bench(["--data-dir", tiny_data, "--quick", "--rounds", "1", "--json", str(out), "--batch-size", "4",
                             "--cache-dir", str(tmp_path / "cache"), "--workers", "0", "--models", "three"])
    data = json.load(open(out))
    assert isinstance(data["device"], str) and data["rows"] == rows
    assert [(r["stage"], r["model"]) for r in rows] == [("input", "-"), ("train", "three"), ("infer", "three")]
    for r in rows:
        assert r["baseline_img_s"] > 0 and r["fast_img_s"] > 0
        assert abs(r["ratio"] - r["fast_img_s"] / r["baseline_img_s"]) < 1e-9
    assert [(r["baseline_batch"], r["fast_batch"]) for r in rows[1:]] == [(4, 4), (4, 4)]
    assert rows[1]["gflop_per_image"] > 3 * rows[2]["gflop_per_image"] * 0.9  # training = forward + backward
    assert calls[:9] == [(4, True)] * (1 + 8) and (4, True) not in calls[9:]  # then the memory table's


def test_bench_compile_times_the_compiled_model(tiny_data, tmp_path, monkeypatch):
    class Counting(torch.nn.Module):  # stands in for the compiled model: compiling takes 20 s on a CPU
        def __init__(self, model):
            super().__init__()
            self.model, self.calls = model, 0

        def forward(self, x):
            self.calls += 1
            return self.model(x)
    compiled = []

    def fake_compile(model, **kw):
        compiled.append((Counting(model), kw))
        return compiled[-1][0]
    monkeypatch.setattr(torch, "compile", fake_compile)
    out = tmp_path / "b.json"
    bench.main_bench(["--data-dir", tiny_data, "--quick", "--rounds", "1", "--compile", "--json", str(out),
                      "--batch-size", "4", "--cache-dir", str(tmp_path / "cache"), "--workers", "0", "--models", "three"])
    assert [kw for _, kw in compiled] == [{"mode": None}]  # no CUDA graphs on a CPU
    assert compiled[0][0].calls == 2 * (3 + 8)  # train and infer: 3 warm-up steps (compiling) + 8 timed, each
    assert json.load(open(out))["compiled"] is True


def test_peak_memory_counts_storages_alive_at_once():
    with gpu_memory.PeakMemory() as mem:
        keep = torch.empty(1000)           # 4,000 bytes, kept
        temp = torch.empty(500)            # 2,000 bytes, then freed
        view = keep[:10].view(2, 5)        # a view: no new storage
        del temp
        after = torch.empty(250)           # 1,000 bytes
    assert mem.peak == 6000 and mem.now == 5000 and view.numel() == 10 and after.numel() == 250


def test_memory_estimate_without_data_equals_the_count_with_real_tensors():
    """Fake tensors (no compute) give exactly what the same step counts with real ones."""
    import models
    from torch._subclasses.fake_tensor import FakeTensorMode

    def step(mode):
        with mode, gpu_memory.PeakMemory() as mem:
            model = models.ThreeCNN()
            opt = torch.optim.Adam(model.parameters())
            x, y = torch.randn(4, 3, 100, 100), torch.zeros(4, dtype=torch.long)
            for _ in range(2):
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        return mem.peak
    import contextlib
    real = step(contextlib.nullcontext())
    assert real == step(FakeTensorMode()) and real > 4 * models.count_params(models.ThreeCNN()) * 4


def test_every_preset_and_model_fits_a_4gb_card_at_its_default_batches():
    rows = bench.main_bench(["--memory"])
    assert {(r["preset"], r["model"]) for r in rows} == {(p, m) for p in recipes.PRESETS for m in ("three", "skip", "ensemble", "res")
                                                         if m in recipes.PRESET_MODELS.get(p, m)}
    assert ("fast", "three") in {(r["preset"], r["model"]) for r in rows}
    assert all(r["fits_4gb"] and r["data_mib"] > 400 for r in rows)
    # why SkipConCNN evaluates at 64 on a GPU: at 256 it would not fit
    big = gpu_memory.estimate_memory("skip", "report", eval_batch=256)
    assert not big["fits_4gb"] and big["eval_peak_mib"] > 2 * next(
        r["eval_peak_mib"] for r in rows if (r["preset"], r["model"]) == ("report", "skip"))


def test_gpu_memory_is_a_command_of_its_own(capsys):
    """python -m tools.gpu_memory prints the table bench --memory prints: a line for each preset and model."""
    import runpy
    runpy.run_path(gpu_memory.__file__, run_name="__main__")  # as python -m runs it
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("--preset")]
    assert len(lines) == sum(m in recipes.PRESET_MODELS.get(p, m) for p in recipes.PRESETS
                             for m in ("three", "skip", "ensemble", "res"))
    assert all(ln.rstrip().endswith("fits") for ln in lines) and any("--preset short  res" in ln for ln in lines)


def test_memory_estimate_counts_the_presets_own_optimizer(monkeypatch):
    """The short preset trains with Muon, which keeps one buffer a conv weight where Adam keeps two: its estimate
    is below the same preset's with AdamW by that second buffer (fp32; Adam's step counts add a few bytes)."""
    import models
    muon = gpu_memory.estimate_memory("res", "short")["train_peak_mib"]
    monkeypatch.setitem(recipes.PRESETS["short"], "optimizer", "adamw")
    adamw = gpu_memory.estimate_memory("res", "short")["train_peak_mib"]
    conv_mib = sum(p.numel() for p in models.build_model("res").parameters() if p.ndim == 4) * 4 / 2**20
    assert adamw - muon == pytest.approx(conv_mib, rel=0.01)


def test_seconds_per_call_times_the_calls_after_two_untimed_ones_on_this_process_threads():
    import time
    calls, threads = [], []

    def fn():
        calls.append(1)
        threads.append(torch.get_num_threads())
        time.sleep(0.01)
    s = bench.seconds_per_call(fn, 3)
    assert len(calls) == 5 and 0.01 <= s < 0.05
    assert set(threads) == {torch.get_num_threads()}  # not the Timer's default of one thread


def test_widths_are_timed_in_turn_in_each_round_and_compared_with_the_first(monkeypatch, capsys):
    timings = iter([1.0, 2.0, 3.0, 5.0])  # round 1: width 8, then 16; round 2: width 8, then 16
    monkeypatch.setattr(bench, "seconds_per_call", lambda fn, calls: next(timings))
    step, flops = bench.width_costs(torch.device("cpu"), None, [8, 16], rounds=2)
    assert step == {8: 2.0, 16: 3.5}  # the median (here the mean) of each width's own rounds
    assert flops[16] > flops[8]
    out = capsys.readouterr().out
    assert "width   16: step   3500.0 ms (1.75x)" in out and f"({flops[16] / flops[8]:.2f}x)" in out
