"""The training flow end to end on tiny generated data: loss, files, checkpoints, schedule, commands."""
import csv
import json
import os

import pandas as pd
import pytest
import torch

from engine import checkpoint
from engine import inference
import main
import models
from engine import optim
from engine import recipes
from engine import promote
from engine import runtime
from conftest import base_args


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """One short ThreeCNN run shared by the tests below."""
    tmp = tmp_path_factory.mktemp("trained")
    rc = main.main([str(a) for a in base_args(tiny_data, tmp, "--epochs", "4", "--lr", "1e-3")])
    assert rc == 0
    return tmp, tmp / "runs" / "r"


def test_training_lowers_the_loss_and_writes_everything(trained, tiny_data):
    tmp, run = trained
    log = list(csv.DictReader(open(run / "log.csv")))
    assert [int(r["epoch"]) for r in log] == [1, 2, 3, 4]
    assert float(log[-1]["train_loss"]) < float(log[0]["train_loss"])
    for f in ["config.json", "log.csv", "last.pth", "best.pth", "report.txt", "report.json", "submission.csv",
              "confusion.png", "curves.png"]:
        assert (run / f).is_file(), f
    assert (tmp / "ckpt" / "three_best.pth").is_file()
    sub = pd.read_csv(run / "submission.csv", dtype=str)
    test = pd.read_csv(os.path.join(tiny_data, "test.csv"), dtype=str)
    assert list(sub.columns) == ["image_id", "label"] and sub.image_id.tolist() == test.image_id.tolist()
    assert set(sub.label.astype(int)) <= set(range(5))
    rep = json.load(open(run / "report.json"))
    best = torch.load(run / "best.pth", weights_only=True)
    assert rep["accuracy"] == pytest.approx(best["best_acc"])
    assert sum(map(sum, rep["confusion_matrix"])) == 20
    text = open(run / "report.txt").read()
    assert "Confusion matrix (rows: actual, columns: predicted)" in text and "precision    recall  f1-score" in text


def test_checkpoint_round_trip_with_weights_only(trained):
    _, run = trained
    ckpt = torch.load(run / "best.pth", weights_only=True)
    for k in ["model", "num_classes", "config", "epoch", "best_acc", "state_dict", "optimizer", "scheduler"]:
        assert k in ckpt
    assert ckpt["model"] == "three" and ckpt["num_classes"] == 5 and ckpt["config"]["lr"] == 1e-3
    m = models.ThreeCNN()
    m.load_state_dict(ckpt["state_dict"])
    assert all(torch.equal(a, ckpt["state_dict"][k]) for k, a in m.state_dict().items())


def test_checkpoints_are_saved_from_the_cpu_with_their_nesting(tmp_path, monkeypatch):
    """A run on a GPU saves from the CPU (without, a plain torch.load on a machine without a GPU fails, and
    the round trip above failed on an H200): every tensor goes through .cpu() on its way to torch.save,
    nesting kept."""
    w = torch.ones(3, requires_grad=True)
    obj = {"state_dict": {"w": w * 2}, "rng": ("MT", [torch.arange(2), 1.5]), "none": None}
    seen = []
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t: (seen.append(t.device), t.detach().clone())[1])
    checkpoint.save(obj, tmp_path / "c.pth")
    back = torch.load(tmp_path / "c.pth", weights_only=True)
    assert len(seen) == 2 and torch.equal(back["state_dict"]["w"], torch.full((3,), 2.0))
    assert back["rng"][0] == "MT" and isinstance(back["rng"], tuple) and torch.equal(back["rng"][1][0], torch.arange(2))
    assert back["none"] is None and not back["state_dict"]["w"].requires_grad


def test_evaluate_and_predict_from_a_checkpoint(trained, tiny_data, run_main):
    tmp, run = trained
    flags = ["--data-dir", tiny_data, "--out-dir", tmp / "cmds", "--cache-dir", tmp / "cache", "--quiet"]
    rc, out, _ = run_main(["--evaluate", run / "best.pth", *flags])
    assert rc == 0 and "Validation accuracy" in out
    folder = next((tmp / "cmds").glob("evaluate-three-*"))
    assert json.load(open(folder / "report.json"))["accuracy"] == json.load(open(run / "report.json"))["accuracy"]
    rc, out, _ = run_main(["--predict", run / "best.pth", *flags])
    sub = next((tmp / "cmds").glob("predict-three-*")) / "submission.csv"
    assert rc == 0 and sub.read_text() == (run / "submission.csv").read_text()


def test_a_new_run_never_destroys_the_earlier_best(trained, tiny_data, run_main, fixed_clock):
    tmp, run = trained
    dest = tmp / "ckpt" / "three_best.pth"
    aside = lambda: sorted(p for p in (tmp / "ckpt").iterdir() if p.name.startswith("three_best.") and p != dest)
    ck = torch.load(dest, weights_only=True)
    ck["val_acc"] = 1.0  # the earlier best scored higher on the same validation rows: it stays
    checkpoint.save(ck, str(dest))
    before = dest.read_bytes()
    rc, out, _ = run_main(base_args(tiny_data, tmp, "--epochs", "1"))
    assert rc == 0 and f"kept {dest}: validation accuracy 100.00%, more than this run's" in out
    assert (tmp / "runs" / "r-2").is_dir() and (tmp / "runs" / "r-2" / "best.pth").is_file()  # a new folder
    assert dest.read_bytes() == before and aside() == []
    # a lower earlier best is moved aside; two within one second (fixed_clock) get two names, neither overwritten
    cfg = {"ckpt_dir": str(tmp / "ckpt"), "model": "three"}
    versions = []
    for k in range(2):
        ck["val_acc"], ck["marker"] = 0.0, k
        checkpoint.save(ck, str(dest))
        versions.append(dest.read_bytes())
        promote.promote(str(tmp / "runs" / "r-2" / "best.pth"), cfg)
    assert [p.name for p in aside()] == ["three_best.20260102-030405-2.pth", "three_best.20260102-030405.pth"]
    assert sorted(p.read_bytes() for p in aside()) == sorted(versions)
    assert dest.read_bytes() == (tmp / "runs" / "r-2" / "best.pth").read_bytes()
    assert (run / "best.pth").is_file()


def test_promoting_the_same_best_again_moves_nothing_aside(trained, tmp_path):
    """A run stopped between promoting its best and writing its submission promotes it again when resumed."""
    tmp, run = trained
    cfg = {"ckpt_dir": str(tmp_path / "ckpt"), "model": "three"}
    for _ in range(2):
        promote.promote(str(run / "best.pth"), cfg)
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if p.name[0] != "."] == ["three_best.pth"]  # and the lock
    assert (tmp_path / "ckpt" / "three_best.pth").read_bytes() == (run / "best.pth").read_bytes()


def test_plateau_schedule_and_early_stopping_act_as_configured(tiny_data, tmp_path, run_main, monkeypatch):
    accs = iter([0.5, 0.6] + [0.6] * 20)  # improves twice, then never again
    monkeypatch.setattr(inference, "evaluate_split", lambda *a, **k: (1.0, next(accs), [0.6] * 5))
    rc, out, _ = run_main(base_args(tiny_data, tmp_path, "--epochs", "50", "--plateau-patience", "2",
                                    "--plateau-factor", "0.5", "--early-stop", "4", "--lr", "1e-3"))
    assert rc == 0 and "early stop" in out
    log = list(csv.DictReader(open(tmp_path / "runs" / "r" / "log.csv")))
    # best at epoch 2; epochs 3-6 bring no gain; the 4th of them stops the run
    assert len(log) == 6
    # ReduceLROnPlateau(patience 2) cuts after the 3rd epoch without gain (epoch 5): epoch 6 runs at half
    assert [float(r["lr"]) for r in log] == [1e-3] * 5 + [5e-4]
    assert torch.load(tmp_path / "runs" / "r" / "best.pth", weights_only=True)["best_epoch"] == 2


def test_recipe_table_defaults_and_overrides():
    cfg, _ = recipes.resolve_config(main.parse_args(["--model", "skip"]))
    assert (cfg["batch_size"], cfg["lr"], cfg["plateau_patience"], cfg["early_stop"]) == (8, 5e-4, 5, 25)
    cfg, _ = recipes.resolve_config(main.parse_args(["--model", "ensemble", "--lr", "3e-4"]))
    assert (cfg["batch_size"], cfg["lr"], cfg["label_smoothing"], cfg["epochs"]) == (4, 3e-4, 0.1, 80)
    cfg, _ = recipes.resolve_config(main.parse_args(["--model", "three"]))
    assert (cfg["plateau_factor"], cfg["plateau_patience"], cfg["early_stop"], cfg["epochs"]) == (0.8, 15, 15, 200)


def test_summary_needs_no_data(run_main):
    rc, out, _ = run_main(["--model", "three", "--summary", "--data-dir", "/nonexistent"])
    assert rc == 0 and "Total params: 691,781" in out
    rc, out, _ = run_main(["--model", "ensemble", "--summary"])
    assert rc == 0 and "trainable parameters: 727" in out
    rc, out, _ = run_main(["--model", "res", "--summary"])  # whitened by default: a frozen stem of 32 x 3 x 3 x 3
    assert rc == 0 and "trainable parameters: 1,957,957" in out and "Trainable params: 1,957,957" in out
    rc, out, _ = run_main(["--model", "res", "--summary", "--no-whiten"])
    assert rc == 0 and "trainable parameters: 1,958,821" in out
    rc, out, _ = run_main(["--model", "res", "--summary", "--full-res-width", "48"])  # frozen stem 48 x 3 x 3 x 3
    assert rc == 0 and "trainable parameters: 1,990,309" in out


def test_a_wider_rescnn_is_judged_as_it_was_trained_and_refused_for_the_reports_models(tiny_data, tmp_path,
                                                                                      run_main):
    flags = ("--model", "res", "--full-res-width", "8", "--epochs", "1", "--batch-size", "4", "--amp", "off",
             "--no-channels-last", "--tta-views", "flip")
    rc, out, err = run_main(base_args(tiny_data, tmp_path, *flags))
    assert rc == 0, err
    run = tmp_path / "runs" / "r"
    assert json.load(open(run / "config.json"))["full_res_width"] == 8
    # --evaluate is not told the width: the checkpoint's run says it (a model of 32 would not load its weights)
    rc, out, err = run_main(["--evaluate", run / "last.pth", "--data-dir", tiny_data, "--out-dir", tmp_path / "cmds",
                             "--cache-dir", tmp_path / "cache", "--quiet"])
    assert rc == 0 and "Validation accuracy" in out, err
    folder = next((tmp_path / "cmds").glob("evaluate-res-*"))
    assert json.load(open(folder / "report.json"))["accuracy"] == json.load(open(run / "report.json"))["accuracy"]
    rc, out, err = run_main(base_args(tiny_data, tmp_path / "three", "--full-res-width", "48"))
    assert rc != 0 and "--full-res-width" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_ensemble_trains_on_frozen_bases(trained, tmp_path, run_main):
    """(A very small data set: every image goes through SkipConCNN, ~27 GFLOP each, slow on a CPU.)"""
    from engine import demo_data
    data = demo_data.build(str(tmp_path / "data"), {"train": 4, "validation": 5, "test": 2}, seed=4)
    tmp, run = trained
    skip = tmp_path / "skip.pth"
    checkpoint.save({"model": "skip", "state_dict": models.SkipConCNN().state_dict(), "config": {}}, str(skip))
    args = base_args(data, tmp_path, "--epochs", "1", "--skip-ckpt", skip, "--three-ckpt", run / "best.pth",
                     "--batch-size", "4")
    args[1] = "ensemble"
    rc, out, err = run_main(args)
    assert rc == 0, err
    assert "727 trainable" in out
    ens = torch.load(tmp_path / "runs" / "r" / "best.pth", weights_only=True)["state_dict"]
    three = torch.load(run / "best.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(ens[f"three.{k}"], v) for k, v in three.items())


@pytest.mark.parametrize("capability, expected", [(7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)])
def test_amp_auto_gives_fp16_to_cards_that_only_emulate_bf16(capability, expected, monkeypatch):
    """PyTorch's own check says a GTX 1650 (compute capability 7.5) 'supports' bf16 because it can emulate it;
    --amp auto must still pick fp16 + GradScaler there. The library's check runs, on a pretend device."""
    import types
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(major=capability))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda d: True)  # emulation works
    assert torch.cuda.is_bf16_supported()  # what the default check says, even on capability 7
    assert runtime.amp_dtype({"amp": "auto"}, torch.device("cuda")) == expected


def test_fused_adam_takes_the_same_steps_as_the_default_adam_on_a_channels_last_bf16_model():
    """Both optimizers get the same gradients each step: fed through the bf16 model, their last-bit differences
    would grow into different gradients (up to 8e-4 apart after three steps on an AVX2 CPU), which is the model's
    rounding, not the optimizer's."""
    import copy
    import torch.nn.functional as F
    torch.manual_seed(3)
    x = torch.randn(4, 3, 100, 100).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 4])
    model = models.ThreeCNN().to(memory_format=torch.channels_last)
    twin, start = copy.deepcopy(model), model.features[0].weight.detach().clone()
    fused = optim.make_optimizer(model.parameters(), 5e-4, 1e-4)
    plain = torch.optim.Adam(twin.parameters(), lr=5e-4, weight_decay=1e-4)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        fused.zero_grad()
        loss.backward()
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
    assert (model.features[0].weight - start).abs().max() > 1e-4  # the steps did something
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(model.parameters(), twin.parameters()))


def test_compile_flag_compiles_the_model_it_trains(tiny_data, tmp_path, run_main, monkeypatch):
    """--compile: the model is compiled (on a CPU without CUDA graphs: mode None) and the run completes."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: (calls.append(kw), model)[1])
    rc, out, err = run_main(base_args(tiny_data, tmp_path, "--compile", "--epochs", "1", "--device", "cpu"))
    assert rc == 0, err
    assert calls == [{"mode": None}] and "--compile pays on a GPU" in out  # and says it was slower on a CPU


def test_compile_that_fails_says_so_in_one_line(tiny_data, tmp_path, run_main, monkeypatch):
    """A machine without a C++ compiler (or Triton) fails at the first compiled step: one line, not the
    compiler's traceback. Here a real torch.compile whose backend fails as such a compiler search does."""
    def no_compiler(graph, example_inputs):
        raise RuntimeError("No working C++ compiler found")
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend=no_compiler))
    rc, out, err = run_main(base_args(tiny_data, tmp_path, "--compile", "--epochs", "1", "--device", "cpu"))
    torch._dynamo.reset()
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error: --compile failed on this machine (")
    assert "No working C++ compiler found" in err and err.strip().endswith("run again without --compile")


def test_a_cpu_without_bf16_says_once_that_it_trains_in_fp32(tiny_data, tmp_path, run_main, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    rc, out, err = run_main(base_args(tiny_data, tmp_path, "--epochs", "2"))
    assert rc == 0, err
    assert out.count("no bf16 instructions") == 1 and "trains in fp32" in out and "GPU" in out
    assert "precision fp32" in out
    cpu, cfg = torch.device("cpu"), dict(recipes.DEFAULTS)
    assert runtime.precision_note({**cfg, "amp": "off"}, cpu, None) is None  # fp32 asked for: nothing to explain
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)  # with bf16: it trains in bf16, no note
    assert runtime.amp_dtype(cfg, cpu) == torch.bfloat16 and runtime.precision_note(cfg, cpu, torch.bfloat16) is None


def test_a_run_reads_each_csv_once_and_loads_its_best_checkpoint_once(tiny_data, tmp_path, run_main, monkeypatch):
    import dataset
    reads, loads = [], []
    read_csv, load = dataset.read_split_csv, torch.load
    monkeypatch.setattr(dataset, "read_split_csv", lambda d, split: (reads.append(split), read_csv(d, split))[1])
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: (loads.append(os.path.basename(str(f))), load(f, *a, **k))[1])
    rc, _, err = run_main(base_args(tiny_data, tmp_path, "--holdout", "0.2"))
    assert rc == 0, err
    assert sorted(reads) == ["test", "train", "validation"]  # held-out rows, loaders, resume digests: one reading
    assert loads.count("best.pth") == 1  # judged, predicted and promoted from one load
