"""Checks on the real competition data; they run when DEEPFAKE_DATA names its folder (CI sets it)."""
import os

import pytest
import torch

import dataloader
import dataset

DATA = os.environ.get("DEEPFAKE_DATA")
pytestmark = pytest.mark.skipif(not DATA, reason="DEEPFAKE_DATA is not set (the real data folder)")


def test_real_validation_has_250_per_class_and_every_image_decodes(tmp_path):
    df = dataset.read_split_csv(DATA, "validation")
    assert len(df) == 1250 and df["label"].value_counts().to_dict() == {k: 250 for k in range(5)}
    data = dataset.load_split_tensors(DATA, "validation", cache_dir=str(tmp_path), log=lambda *a: None)
    assert data["images"].shape == (1250, 3, 100, 100) and data["images"].dtype == torch.uint8
    assert data["ids"] == df["image_id"].tolist()
    assert data["images"].float().std() > 20  # real pictures, not blanks


def test_real_train_and_test_are_complete():
    train = dataset.read_split_csv(DATA, "train")
    assert len(train) == 12500 and set(train["label"].value_counts()) == {2500}
    assert len(dataset.find_images(DATA, "train", train["image_id"].tolist())) == 12500
    test = dataset.read_split_csv(DATA, "test")
    assert len(dataset.find_images(DATA, "test", test["image_id"].tolist())) == len(test) > 0


def test_real_images_are_the_same_through_both_loaders(tmp_path):
    kw = dict(device="cpu", cache_dir=str(tmp_path), workers=0, log=lambda *a: None)
    fast = dataloader.make_batches(DATA, "validation", 16, False, loader="tensors", **kw)
    slow = dataloader.make_batches(DATA, "validation", 16, False, loader="images", **kw)
    (xa, ya, _), (xb, yb, _) = next(fast.batches(fast.plan())), next(slow.batches(slow.plan()))
    assert torch.allclose(xa, xb, atol=1e-5) and torch.equal(ya, yb)
