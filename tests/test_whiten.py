"""--whiten (engine/whiten.py): the first convolution's filters whiten the training images' patches, stay frozen
through a run and its resume, and are refused where there is nothing to whiten."""
import torch
import torch.nn.functional as F

import dataloader
import dataset
import models
from conftest import base_args, stop_at_loss
from engine import recipes, whiten


def test_the_filters_turn_correlated_patches_into_uncorrelated_ones_of_unit_variance():
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(60, 3, 40, 40, generator=gen)
    mix = torch.tensor([[1.0, 0.5, 0.2], [0.3, 1.0, 0.1], [0.0, 0.4, 1.0]])  # colours alike, as in photographs
    images = F.avg_pool2d(torch.einsum("oc,nchw->nohw", mix, noise), 3, stride=1) * 20 + 1  # neighbours alike
    filters = whiten.whitening_filters(images, (3, 3), 60)
    out = F.conv2d(images, filters).transpose(0, 1).reshape(60, -1).double()
    cov = torch.cov(out[:27])  # (directions of variance much above whiten.EPS)
    assert torch.allclose(cov, torch.eye(27, dtype=torch.float64), atol=0.02), cov.diagonal()
    assert torch.equal(filters[27:54], -filters[:27])  # then the negatives, in the same order
    assert torch.equal(filters[54:], filters[:6])  # and round again until the layer is full
    raw = F.unfold(images, 3).transpose(1, 2).reshape(-1, 27).double()  # the directions by falling variance:
    spread = [(raw @ f.reshape(-1).double()).var() / f.double().norm() ** 2 for f in filters[:27]]
    assert all(a >= b for a, b in zip(spread, spread[1:]))  # the first is the direction of largest variance


def test_a_whitened_run_steps_all_but_its_first_convolution_and_resumes_exactly(tiny_data, tmp_path, run_main,
                                                                                monkeypatch):
    flags = ("--model", "res", "--batch-size", "4", "--epochs", "3", "--whiten", "--deterministic", "--amp", "bf16",
             "--channels-last", "--tta-views", "flip")  # no timing steps (they would count as losses below)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    rc, out, err = run_main(base_args(tiny_data, ref, *flags))
    assert rc == 0, err
    full, frozen = models.count_params(models.build_model("res")), 32 * 3 * 3 * 3
    assert f"({full - frozen:,} trainable parameters)" in out
    images = dataset.load_split_tensors(tiny_data, "train", str(ref / "cache"))["images"]
    expected = whiten.whitening_filters(dataloader.normalize(images.float()), (3, 3), 32)
    a = torch.load(ref / "runs" / "r" / "last.pth", weights_only=True)
    assert torch.equal(a["state_dict"]["features.0.weight"].contiguous(), expected)  # not stepped, not decayed
    start = models.build_model("res").state_dict()
    assert not torch.equal(a["state_dict"]["features.3.body.0.weight"], start["features.3.body.0.weight"])
    stop_at_loss(monkeypatch, 6)  # epoch 2, step 2 of 4
    assert run_main(base_args(tiny_data, cut, *flags))[0] == 143
    monkeypatch.undo()
    rc, out, err = run_main(["--resume", cut / "runs" / "r"])
    assert rc == 0, err
    b = torch.load(cut / "runs" / "r" / "last.pth", weights_only=True)
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())


def test_both_loaders_give_the_same_unaugmented_training_images(tiny_data, tmp_path):
    cfg = {**recipes.DEFAULTS, "data_dir": tiny_data, "cache_dir": str(tmp_path), "batch_size": 4, "rotate": 15.0}
    by = {kind: dataloader.loaders_for({**cfg, "loader": kind}, "cpu", ["train"], "train")["train"]
          for kind in ("tensors", "images")}
    assert type(by["images"]).__name__ == "ImageBatches"
    a, b = (whiten.training_images(by[kind], n=10) for kind in ("tensors", "images"))
    assert a.shape == (10, 3, 100, 100) and torch.allclose(a, b, atol=1e-5)


def test_whiten_with_the_ensemble_is_one_line(tiny_data, tmp_path, run_main):
    rc, out, err = run_main(base_args(tiny_data, tmp_path, "--model", "ensemble", "--whiten"))
    assert rc == 2 and "--whiten" in err and "Traceback" not in err
