"""The data side: CSV checks, image lookup and decoding, the transforms, the decode-once cache."""
import os

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

import dataloader
import dataset
from engine import demo_data


# ---------------------------------------------------------------------------------------------- transforms

def test_report_transforms_are_the_reports():
    train = dataloader.report_transform(train=True).transforms
    kinds = [type(t) for t in train]
    assert kinds == [transforms.Resize, transforms.RandomHorizontalFlip, transforms.RandomRotation,
                     transforms.ToTensor, transforms.Normalize]
    assert train[0].size == (100, 100) and train[1].p == 0.5 and train[2].degrees == [-15.0, 15.0]
    assert list(train[4].mean) == [0.485, 0.456, 0.406] and list(train[4].std) == [0.229, 0.224, 0.225]
    val = [type(t) for t in dataloader.report_transform(train=False).transforms]
    assert val == [transforms.Resize, transforms.ToTensor, transforms.Normalize]


def test_batched_normalisation_equals_torchvision():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8))
    ref = dataloader.report_transform(train=False)(img)
    ours = dataloader.normalize(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None])[0]
    assert torch.allclose(ref, ours, atol=1e-5)


def test_flip_rate_and_angle_range():
    gen = torch.Generator().manual_seed(0)
    p = dataloader.draw_augment_params(20000, gen)
    flips, angles = p["flips"], p["angles"]
    assert "shifts" not in p  # the report's augmentation draws no shifts: its runs replay as before
    assert abs(flips.float().mean().item() - 0.5) < 0.02
    assert angles.min() >= -15 and angles.max() <= 15
    assert angles.min() < -14.9 and angles.max() > 14.9
    assert abs(angles.mean().item()) < 0.3  # uniform, centred


# Measured: no pixel differs from torchvision's tensor rotate at these angles (about 7 in a million over
# random angles, where a source coordinate is within float rounding of a half pixel); at most ~0.1% from
# Pillow's rotate (the report's per-image path), on the rim. Bounds: 0.01% and 1%.
TENSOR_BOUND = 1e-4
PIL_BOUND = 0.01


@pytest.mark.parametrize("angle", [-15.0, -7.3, 0.0, 4.2, 11.9, 15.0])
def test_batched_rotation_matches_torchvision(angle):
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, 100, 100), dtype=np.uint8))
    ours = dataloader.augment_batch(x, torch.tensor([False, True]), torch.tensor([angle, angle]))
    for k, flip in enumerate([False, True]):
        src = TF.hflip(x[k]) if flip else x[k]
        tensor_ref = dataloader.normalize(TF.rotate(src, angle, interpolation=InterpolationMode.NEAREST)[None])[0]
        assert ((ours[k] - tensor_ref).abs().amax(0) > 1e-4).float().mean().item() <= TENSOR_BOUND
        pil = TF.to_pil_image(src).rotate(angle, resample=Image.NEAREST)  # what RandomRotation does to a PIL image
        pil_ref = dataloader.normalize(TF.pil_to_tensor(pil)[None])[0]
        differ = ((ours[k] - pil_ref).abs().amax(0) > 1e-4).float().mean().item()
        assert differ <= PIL_BOUND


def test_batched_rotation_over_random_angles_and_flips():
    x = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (64, 3, 100, 100), dtype=np.uint8))
    p = dataloader.draw_augment_params(64, torch.Generator().manual_seed(3), max_angle=180.0)
    flips, angles = p["flips"], p["angles"]
    ours = dataloader.augment_batch(x, flips, angles)
    ref = torch.stack([TF.rotate(TF.hflip(img) if f else img, a.item(), interpolation=InterpolationMode.NEAREST)
                       for img, f, a in zip(x, flips, angles)])
    differ = ((ours - dataloader.normalize(ref)).abs().amax(1) > 1e-4).float().mean().item()
    assert differ <= TENSOR_BOUND


def test_rotation_turns_counter_clockwise_and_fills_black():
    x = torch.zeros(1, 3, 100, 100, dtype=torch.uint8)
    x[..., 45:55, 80:95] = 255  # a bright patch right of centre
    out = dataloader.augment_batch(x, torch.tensor([False]), torch.tensor([90.0]))
    black = dataloader.normalize(torch.zeros(1, 3, 1, 1))[0, :, 0, 0]
    bright = out[0, 0] > 0
    ys, xs = bright.nonzero(as_tuple=True)
    assert ys.float().mean() < 30 and 40 < xs.float().mean() < 60  # moved to the top: counter-clockwise
    corner = dataloader.augment_batch(torch.full((1, 3, 100, 100), 200, dtype=torch.uint8), torch.tensor([False]),
                                      torch.tensor([15.0]))[0, :, 0, 0]
    assert torch.allclose(corner, black, atol=1e-5)


def test_shift_moves_whole_pixels_with_zero_fill_and_no_rotation_keeps_every_pixel():
    x = torch.from_numpy(np.random.default_rng(4).integers(1, 256, (3, 3, 100, 100), dtype=np.uint8))
    p = dataloader.draw_augment_params(3, torch.Generator().manual_seed(5), max_angle=0.0, shift=4)
    assert p["shifts"].abs().max() <= 4 and (p["angles"] == 0).all()
    shifts = torch.tensor([[2, -3], [0, 0], [-4, 4]])
    out = dataloader.flip_rotate(x, torch.tensor([False, True, True]), p["angles"], shifts)
    assert torch.equal(out[0, :, 2:, :97], x[0, :, :98, 3:])  # moved down 2 and left 3: no pixel resampled
    assert (out[0, :, :2] == 0).all() and (out[0, :, :, 97:] == 0).all()  # what came in is zero
    assert torch.equal(out[1], x[1].flip(2))  # no shift, no angle: the flip alone
    assert torch.equal(out[2, :, :96, 4:], x[2].flip(2)[:, 4:, :96])
    spread = dataloader.draw_augment_params(20000, torch.Generator().manual_seed(6), 0.0, shift=2)["shifts"]
    assert set(spread.flatten().tolist()) == {-2, -1, 0, 1, 2}


def test_the_per_image_transforms_take_the_same_rotation_and_shift():
    kinds = [type(t) for t in dataloader.report_transform(True, max_angle=0, shift=3).transforms]
    assert kinds == [transforms.Resize, transforms.RandomHorizontalFlip, transforms.RandomCrop, transforms.ToTensor,
                     transforms.Normalize]
    crop = dataloader.report_transform(True, max_angle=0, shift=3).transforms[2]
    assert crop.padding == 3 and crop.size == (100, 100) and crop.fill == 0


def test_tensor_and_image_loaders_give_the_same_eval_batches(tiny_data, tmp_path):
    kw = dict(device="cpu", cache_dir=str(tmp_path), workers=0)
    a = dataloader.make_batches(tiny_data, "validation", 8, False, loader="tensors", **kw)
    b = dataloader.make_batches(tiny_data, "validation", 8, False, loader="images", **kw)
    assert isinstance(a, dataloader.TensorBatches) and isinstance(b, dataloader.ImageBatches)
    for (xa, ya, ia), (xb, yb, ib) in zip(a.batches(a.plan()), b.batches(b.plan())):
        assert torch.allclose(xa, xb, atol=1e-5) and torch.equal(ya, yb) and torch.equal(ia, ib)


def test_tensor_loader_takes_up_the_image_loaders_plan(tiny_data, tmp_path):
    """A run stopped mid-epoch on --loader images may resume on --loader tensors: its plan has no flips yet."""
    kw = dict(device="cpu", cache_dir=str(tmp_path), workers=0)
    images = dataloader.make_batches(tiny_data, "train", 8, True, loader="images", **kw)
    tensors = dataloader.make_batches(tiny_data, "train", 8, True, loader="tensors", **kw)
    plan = images.plan(torch.Generator().manual_seed(0))
    assert list(plan) == ["order"]
    got = list(tensors.batches(plan, torch.Generator().manual_seed(1), start=1))
    assert len(got) == len(tensors) - 1 and torch.equal(got[0][2], plan["order"][8:16])


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shard", [(0, 1), (1, 2)], ids=["one process", "second of two"])
def test_chunked_augmentation_gives_the_same_batches(train, shard):
    """On a GPU the images of several steps are augmented at once (dataloader.GPU_CHUNK_IMAGES): the batches,
    labels and positions are those of one batch at a time, from any step a resume starts at."""
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randint(0, 256, (70, 3, 100, 100), generator=gen, dtype=torch.uint8), torch.arange(70) % 5
    one, chunked = (dataloader.TensorBatches(images, labels, None, 8, train, "cpu", shard, chunk=c) for c in (1, 3))
    plan = one.plan(torch.Generator().manual_seed(1))
    for start in (0, 2):
        a, b = list(one.batches(plan, None, start)), list(chunked.batches(plan, None, start))
        last = {(True, 1): 8, (True, 2): 4, (False, 1): 6, (False, 2): 3}[train, shard[1]]  # 70 = 8 x 8 + 6
        assert len(a) == len(b) == len(one) - start and len(a[-1][2]) == len(b[-1][2]) == last
        for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)


def test_chunks_take_the_augmentations_ops_out_of_most_steps():
    """Each op is a kernel launch on a GPU: augmented one batch at a time, a step of 16 costs ~35 of them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            Ops.n += not func.is_view  # views launch nothing
            return out
    images, labels = torch.zeros(256, 3, 100, 100, dtype=torch.uint8), torch.zeros(256, dtype=torch.long)
    per_step = {}
    for chunk in (1, dataloader.chunk_steps(16, "cuda")):
        b = dataloader.TensorBatches(images, labels, None, 16, True, "cpu", chunk=chunk)
        plan, Ops.n = b.plan(torch.Generator().manual_seed(0)), 0
        with Ops():
            steps = sum(1 for _ in b.batches(plan))
        per_step[chunk] = Ops.n / steps
    assert dataloader.chunk_steps(16, "cuda") == 16 and dataloader.chunk_steps(256, "cuda") == 1
    assert dataloader.chunk_steps(16, "cpu") == 1
    assert per_step[1] > 30 and per_step[16] < 4, per_step


def test_memory_budget_falls_back_to_the_image_loader(tiny_data, tmp_path):
    notes = []
    for _ in range(2):  # main.py loads validation twice (training, then the report): one note
        b = dataloader.make_batches(tiny_data, "train", 8, True, "cpu", cache_dir=str(tmp_path), workers=0,
                                    max_memory_gb=1e-6, log=notes.append)
    assert isinstance(b, dataloader.ImageBatches)
    assert notes == ["note: train (0 MB decoded) exceeds --max-memory-gb 1e-06; using the per-image loader"]
    x, y, _ = next(b.batches(b.plan(torch.Generator().manual_seed(0)), torch.Generator().manual_seed(0)))
    assert x.shape == (8, 3, 100, 100) and y.shape == (8,)
    assert len(b) == 16 // 8  # drop_last in training


# ---------------------------------------------------------------------------------------------- decoding

def test_decoding_converts_modes_and_sizes(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (100, 100), dtype=np.uint8), "L").save(tmp_path / "gray.png")
    Image.fromarray(rng.integers(0, 256, (64, 80, 4), dtype=np.uint8), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)).convert("P").save(tmp_path / "pal.png")
    for name in ["gray", "rgba", "pal"]:
        im = dataset.decode_image(str(tmp_path / f"{name}.png"))
        assert im.mode == "RGB" and im.size == (100, 100)


def test_images_found_with_other_extensions(copy_data):
    ids = dataset.read_split_csv(copy_data, "validation")["image_id"].tolist()
    for k, i in enumerate(ids):  # re-save some as WebP (lossless) and some as JPEG
        png = os.path.join(copy_data, "validation", f"{i}.png")
        ext = ["png", "webp", "jpg"][k % 3]
        if ext != "png":
            kw = {"lossless": True} if ext == "webp" else {}
            Image.open(png).save(png[:-3] + ext, **kw)
            os.remove(png)
    ds = dataset.CsvImageDataset(copy_data, "validation")
    assert [os.path.splitext(p)[1] for p in ds.paths[:3]] == [".png", ".webp", ".jpg"]
    img, label = ds[1]
    assert img.size == (100, 100) and label == ds.labels[1]
    img, image_id = dataset.CsvImageDataset(copy_data, "test")[0]
    assert isinstance(image_id, str)


def test_decode_cache_is_reused_and_invalidated(copy_data, tmp_path):
    tmp_path = tmp_path / "cache"
    msgs = []
    a = dataset.load_split_tensors(copy_data, "validation", str(tmp_path), log=msgs.append)
    b = dataset.load_split_tensors(copy_data, "validation", str(tmp_path), log=msgs.append)
    assert len(msgs) == 1 and torch.equal(a["images"], b["images"]) and a["ids"] == b["ids"]
    assert a["images"].dtype == torch.uint8 and a["images"].shape == (20, 3, 100, 100)
    path = os.path.join(copy_data, "validation", a["ids"][0] + ".png")  # replace one image
    Image.new("RGB", (100, 100), (10, 20, 30)).save(path)
    os.utime(path, ns=(1, 1))
    c = dataset.load_split_tensors(copy_data, "validation", str(tmp_path), log=msgs.append)
    assert len(msgs) == 2 and c["images"][0, :, 0, 0].tolist() == [10, 20, 30]
    assert sorted(os.listdir(tmp_path))[1:] == [f for f in os.listdir(tmp_path) if f.endswith(".pt")]  # and the lock
    assert len(os.listdir(tmp_path)) == 2  # the stale cache was removed


def test_decode_cache_is_written_when_another_process_removes_a_stale_one_first(tiny_data, tmp_path, monkeypatch):
    # Under torchrun every process decodes and caches: one may remove a stale cache between the other's
    # listing the folder and removing it.
    cache = tmp_path / "cache"
    cache.mkdir()
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p: listdir(p) + (["validation-0123456789abcdef.pt"]
                                                               if str(p) == str(cache) else []))
    msgs = []
    dataset.load_split_tensors(tiny_data, "validation", str(cache), log=msgs.append)
    assert len(msgs) == 1 and msgs[0].startswith("decoding")  # no "could not write the decode cache"
    assert sorted(listdir(cache)) == [".validation.lock", next(f for f in listdir(cache) if f.endswith(".pt"))]


def test_a_disk_that_fills_up_while_caching_leaves_no_partial_file(tiny_data, tmp_path, monkeypatch):
    import errno

    def save_until_full(obj, f):  # writes part of the file, then the disk is full
        f.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", save_until_full)
    msgs = []
    data = dataset.load_split_tensors(tiny_data, "validation", str(tmp_path / "cache"), log=msgs.append)
    assert data["images"].shape == (20, 3, 100, 100)  # the run goes on with the decoded split
    assert msgs[-1].startswith("note: could not write the decode cache") and "No space left" in msgs[-1]
    assert os.listdir(tmp_path / "cache") == [".validation.lock"]  # not a partial file filling the disk further


def test_read_only_data_folder_caches_elsewhere(copy_data, tmp_path, monkeypatch):
    os.chmod(copy_data, 0o555)
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert dataset.default_cache_dir(copy_data).startswith(str(tmp_path / "xdg"))
    finally:
        os.chmod(copy_data, 0o755)
    assert dataset.default_cache_dir(copy_data) == os.path.join(copy_data, ".cache")


# ---------------------------------------------------------------------------------------------- demo data

def test_demo_classes_are_not_told_apart_by_mean_colour(tmp_path):
    from sklearn.linear_model import LogisticRegression
    d = demo_data.build(str(tmp_path), {"train": 400, "validation": 200}, seed=3)
    tr = dataset.load_split_tensors(d, "train", log=lambda *a: None)
    va = dataset.load_split_tensors(d, "validation", log=lambda *a: None)
    feat = lambda s: s["images"].float().mean((2, 3)).numpy()
    clf = LogisticRegression(max_iter=5000).fit(feat(tr), tr["labels"].numpy())
    assert clf.score(feat(va), va["labels"].numpy()) < 0.40
    assert torch.bincount(va["labels"]).tolist() == [40] * 5


def test_a_demo_set_of_an_older_version_is_built_again_and_a_current_one_is_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo_data, "SPLIT_SIZES", {"train": 5, "validation": 5, "test": 5})
    dest = str(tmp_path / "demo")
    demo_data.ensure(dest)
    assert "building" in capsys.readouterr().out
    demo_data.ensure(dest)
    assert capsys.readouterr().out == ""  # complete and current: kept as it is
    with open(os.path.join(dest, ".version"), "w") as f:
        f.write("1\n")  # a set made by an older demo_data.py
    os.remove(os.path.join(dest, "train", "demo-train-00000.png"))
    demo_data.ensure(dest)
    assert "building" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(dest, "train", "demo-train-00000.png"))
    assert open(os.path.join(dest, ".version")).read().strip() == demo_data.VERSION
