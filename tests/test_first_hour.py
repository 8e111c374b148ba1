"""A student's first hour: a checkpoint is judged as its run judged it, the device a run trains on is said, and
a bare --resume continues the latest run whatever its model."""
import pandas as pd

from engine import runtime
from conftest import base_args


def quick(data, tmp_path, *extra):
    args = base_args(data, tmp_path, "--epochs", "1", *extra)
    del args[args.index("--run-name"):args.index("--run-name") + 2]  # folders named <model>-<time>, as by default
    return args


def test_a_bare_resume_continues_the_latest_run_of_any_model(tiny_data, tmp_path, run_main):
    assert run_main(quick(tiny_data, tmp_path, "--model", "three"))[0] == 0
    assert run_main(quick(tiny_data, tmp_path, "--model", "res", "--batch-size", "4"))[0] == 0
    res_run = next((tmp_path / "runs").glob("res-*"))
    three_run = next((tmp_path / "runs").glob("three-*"))
    rc, out, err = run_main(["--resume", "--out-dir", tmp_path / "runs"])
    assert rc == 0 and f"{res_run}" in out and "nothing to do" in out, err  # the latest: ResCNN's
    rc, out, err = run_main(["--model", "three", "--resume", "--out-dir", tmp_path / "runs"])
    assert rc == 0 and f"{three_run}" in out and f"{res_run}" not in out, err
    rc, out, err = run_main(["--model", "skip", "--resume", "--out-dir", tmp_path / "runs"])
    assert rc == 2 and "no run of 'skip' with a last.pth" in err


def test_evaluate_and_predict_judge_a_checkpoint_as_its_run_did_unless_told_otherwise(tiny_data, tmp_path, run_main):
    import json
    assert run_main(base_args(tiny_data, tmp_path, "--epochs", "1", "--tta", "--tta-views", "flip_rotate",
                              "--amp", "off"))[0] == 0
    run = tmp_path / "runs" / "r"
    flags = ["--data-dir", tiny_data, "--out-dir", tmp_path / "cmds", "--cache-dir", tmp_path / "cache", "--quiet"]
    rc, out, err = run_main(["--evaluate", run / "best.pth", *flags])
    assert rc == 0 and f"{run / 'best.pth'}: judged with TTA (flip_rotate), trained weights, fp32" in out, err
    folder = next((tmp_path / "cmds").glob("evaluate-three-*"))
    assert json.load(open(folder / "report.json")) == {**json.load(open(run / "report.json")),
                                                       "checkpoints": [str(run / "best.pth")]}
    rc, out, err = run_main(["--predict", run / "best.pth", *flags])
    sub = next((tmp_path / "cmds").glob("predict-three-*")) / "submission.csv"
    assert rc == 0 and pd.read_csv(sub).equals(pd.read_csv(run / "submission.csv")), err
    rc, out, err = run_main(["--evaluate", run / "best.pth", "--no-tta", *flags])  # a flag given wins
    assert rc == 0 and "judged with no TTA, trained weights, fp32" in out, err


def test_a_run_that_falls_back_to_the_cpu_says_so_once_and_cuda_without_a_gpu_stays_an_error(tiny_data, tmp_path,
                                                                                            run_main, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, out, err = run_main(base_args(tiny_data, tmp_path / "a", "--epochs", "1"))
    assert rc == 0 and out.count("note: no CUDA GPU found") == 1 and "--minutes N" in out, err
    rc, out, err = run_main(base_args(tiny_data, tmp_path / "b", "--epochs", "1", "--device", "cpu"))
    assert rc == 0 and "no CUDA GPU found" not in out  # asked for: no note
    rc, out, err = run_main(base_args(tiny_data, tmp_path / "c", "--device", "cuda"))
    assert rc == 2 and "no CUDA GPU is available" in err
    assert runtime.device_note({"device": None}, torch.device("cuda", 0)) is None


def test_promotion_compares_validation_accuracy_whatever_chose_each_checkpoint(tiny_data, tmp_path, run_main):
    from engine import checkpoint
    import torch
    assert run_main(base_args(tiny_data, tmp_path, "--epochs", "1"))[0] == 0
    run, dest = tmp_path / "runs" / "r", tmp_path / "ckpt" / "three_best.pth"
    ck = torch.load(run / "best.pth", weights_only=True)
    assert ck["val_acc"] == ck["best_acc"]  # judged on validation at the end of its run, and saved
    held_out = {**ck, "best_acc": 0.99, "val_acc": 0.01, "config": {**ck["config"], "select": "holdout"}}
    checkpoint.save(held_out, str(dest))  # an earlier best chosen on held-out rows, at 99% there, 1% on validation
    rc, out, err = run_main(base_args(tiny_data, tmp_path, "--epochs", "1", "--run-name", "r2"))
    assert rc == 0 and f"kept the previous {dest}" in out, err  # displaced: compared on validation, not on 99%
    assert torch.load(dest, weights_only=True)["val_acc"] == torch.load(tmp_path / "runs" / "r2" / "best.pth",
                                                                         weights_only=True)["val_acc"]
