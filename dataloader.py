"""From a split on disk to batches of normalised images, two ways behind one interface.

    ImageBatches   the report's path: Pillow decodes each image every epoch, torchvision transforms it,
                   DataLoader worker processes batch it.
    TensorBatches  the fast path: the split decoded once into a uint8 tensor (dataset.load_split_tensors)
                   kept on the training device; each batch is gathered by index and augmented whole (on a
                   GPU, several batches at once: GPU_CHUNK_IMAGES).

loaders_for makes the loaders of a run or a command (training, validation, --holdout's rows, test) at their
batch sizes. Both kinds give `plan(gen)` (the epoch's plan: sample order, and for TensorBatches every flip,
angle and shift) and `batches(plan, gen, start)` which yields (images float NCHW on the device, labels or
None, positions in the split). The augmentation is the same either way: horizontal flip p=0.5, rotation uniform in
[-ROTATE, ROTATE] degrees (nearest, zero fill; the report's 15, --rotate), a shift by whole pixels in
[-SHIFT, SHIFT] on each axis (zero fill; off in the report, --shift), then ImageNet normalisation;
validation and test are only normalised.
"""
import math

import torch
import torch.nn.functional as F

import dataset
from engine import runtime

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as the report normalises
STD = (0.229, 0.224, 0.225)
MAX_ANGLE = 15.0  # the report's rotation (--rotate)
FLIP_P = 0.5


# ----------------------------------------------------------------------------------------------
# The report's per-image transforms (torchvision)

def report_transform(train, max_angle=MAX_ANGLE, shift=0):
    from torchvision import transforms  # here: its import takes seconds, and the fast path needs none of it
    steps = [transforms.Resize((dataset.IMAGE_SIZE, dataset.IMAGE_SIZE))]
    if train:
        steps.append(transforms.RandomHorizontalFlip(FLIP_P))
        if max_angle:
            steps.append(transforms.RandomRotation(max_angle))
        if shift:  # a crop of the zero-padded image: a shift by whole pixels
            steps.append(transforms.RandomCrop(dataset.IMAGE_SIZE, padding=shift))
    steps += [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    return transforms.Compose(steps)


# ----------------------------------------------------------------------------------------------
# The same augmentation on a whole batch at once (any device)

_NORM = {}


def normalize(x):
    """uint8 or 0..255 float (N,3,H,W) -> ImageNet-normalised float32.
    In-place mul_ and add_ (not addcmul, 4x slower with this broadcast on a CPU)."""
    if x.device not in _NORM:
        std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1) * 255
        mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1) * 255
        _NORM[x.device] = (1 / std, -mean / std)
    scale, shift = _NORM[x.device]
    return x.float().mul_(scale).add_(shift) if x.dtype == torch.uint8 else x.mul(scale).add_(shift)


def draw_augment_params(n, gen, max_angle=MAX_ANGLE, flip_p=FLIP_P, shift=0):
    """Per-image flips, angles and (with shift) whole-pixel shifts (N, 2: rows, columns), drawn on the CPU from
    `gen` so a run replays exactly on any device. No shift draws nothing more: the report's runs replay as before."""
    flips = torch.rand(n, generator=gen) < flip_p
    angles = torch.empty(n).uniform_(-max_angle, max_angle, generator=gen)
    params = {"flips": flips, "angles": angles}
    if shift:
        params["shifts"] = torch.randint(-shift, shift + 1, (n, 2), generator=gen)
    return params


def flip_rotate(x, flips, angles, shifts=None, max_shift=None):
    """Flip where `flips`, then rotate by `angles` degrees about the centre (counter-clockwise for positive
    angles, as torchvision's rotate), nearest pixel, then move by `shifts` whole pixels (rows, columns;
    None: no shift; max_shift: their largest size, when known, to spare a look at them), zero fill; any dtype,
    shape (N,C,H,W).

    A nearest-pixel rotation only moves pixels, so no image is interpolated: each output pixel's source
    row and column are computed once per image, as an outer sum of two short vectors (the centred pixel
    coordinates turned by the angle), rounded half to even like grid_sample, and the pixels are gathered.
    A flip just negates the column offset. Any rotation about the centre reads at most (sqrt(2)-1)/2 of
    the size outside the image, so padding the batch that much with zeros makes every index valid and
    gives the zero fill for free; a shift reads that much further out, so the padding grows by it. Matches
    torchvision's rotate except where a source coordinate lands within float rounding of a half pixel
    (tests: under 0.01% of pixels).
    """
    n, c, h, w = x.shape
    if max_shift is None:
        max_shift = 0 if shifts is None or not len(shifts) else int(shifts.abs().max())
    p = math.ceil((math.sqrt(2) - 1) / 2 * max(h, w)) + 1 + max_shift
    rad = angles.to(x.device, torch.float32) * (math.pi / 180)
    sign = 1 - 2 * flips.to(x.device, torch.float32)
    cos, sin = rad.cos(), rad.sin()
    u = torch.arange(w, device=x.device, dtype=torch.float32) - (w - 1) / 2  # output columns, centred
    v = torch.arange(h, device=x.device, dtype=torch.float32) - (h - 1) / 2
    u, v = u.expand(n, w), v.expand(n, h)
    if shifts is not None:  # output pixel (i, j) shows the turned image's (i - dy, j - dx): it moves by (dy, dx)
        shifts = shifts.to(x.device, torch.float32)
        u, v = u - shifts[:, 1, None], v - shifts[:, 0, None]
    col = ((sign * cos)[:, None, None] * u[:, None, :] + ((-sign * sin)[:, None] * v + (w - 1) / 2 + p)[:, :, None])
    row = (sin[:, None, None] * u[:, None, :] + (cos[:, None] * v + (h - 1) / 2 + p)[:, :, None])
    col, row = col.round_(), row.round_()
    src = row.mul_(w + 2 * p).add_(col).long().view(n, 1, h * w).expand(n, c, h * w)
    padded = F.pad(x, (p, p, p, p)).view(n, c, -1)
    return padded.gather(2, src).view(n, c, h, w)


def augment_batch(x, flips, angles, shifts=None, max_shift=None):
    """The train augmentation on a uint8 batch (N,3,H,W): flip, rotate, shift (see flip_rotate), normalise."""
    return normalize(flip_rotate(x, flips, angles, shifts, max_shift))


TTA_ANGLES = (8.0, -8.0)
TTA_VIEWS = ("flip", "flip_rotate", "flip_shift")  # --tta-views


def tta_views(x, kind="flip_rotate"):
    """Test-time views of a normalised batch: as is and flipped; with flip_rotate also turned by +-8 degrees
    (black fill); with flip_shift also both moved by one whole pixel down-right and up-left (the edge mirrored
    into the gap): airbench's test-time views. Whole pixels keep the pixel grid the generators leave their traces
    on, which a turn resamples."""
    views = [x, x.flip(3)]
    if kind == "flip_shift":
        padded = F.pad(torch.cat(views), (1, 1, 1, 1), mode="reflect")
        h, w = x.shape[2:]
        for dy, dx in ((0, 0), (2, 2)):  # the crop at (0, 0) moves the image down-right by one, at (2, 2) up-left
            views += list(padded[:, :, dy:dy + h, dx:dx + w].chunk(2))
    if kind == "flip_rotate":
        black = normalize(torch.zeros(1, 3, 1, 1, device=x.device))
        no_flip = torch.zeros(len(x), dtype=torch.bool)
        for a in TTA_ANGLES:
            views.append(flip_rotate(x - black, no_flip, torch.full((len(x),), a)) + black)
    return views


# ----------------------------------------------------------------------------------------------
# Loaders

class _Batches:
    """Shared logic: the epoch's plan, batch slicing, and the share of each batch this process trains on."""

    def __init__(self, n, labels, ids, batch_size, train, device, shard=(0, 1)):
        self.n, self.labels, self.ids = n, labels, ids  # labels stay on the CPU for reports
        self.batch_size, self.train, self.device = batch_size, train, torch.device(device)
        self.rank, self.world = shard

    def __len__(self):  # steps per epoch; the last partial batch is dropped in training only
        return self.n // self.batch_size if self.train else math.ceil(self.n / self.batch_size)

    def plan(self, gen=None):
        """The epoch's plan, drawn from `gen` when the epoch starts: the sample order (shuffled for
        training). A checkpoint keeps the plan, so a run stopped mid-epoch resumes it exactly."""
        return {"order": torch.randperm(self.n, generator=gen) if self.train else torch.arange(self.n)}

    def _batch_slices(self, start):
        """(slice of the epoch for step k, this process's share of it) for each step from `start`."""
        for k in range(start, len(self)):
            yield slice(k * self.batch_size, (k + 1) * self.batch_size), slice(self.rank, None, self.world)


# On a GPU, the images of this many steps are gathered and augmented at once, then handed out a batch at a
# time. Why: at the report's batches (4-16) a GPU step waits on launching its ~130 small kernels, not on
# running them, and the augmentation launches ~35 of them whatever the batch size; augmented 256 images at a
# time, a step's share is ~2 (counted: a ThreeCNN step is ~100 ops). Not on a CPU, where an op costs its work,
# not its launch: there chunks were not reliably faster, and large ones slower (out of cache). Each image's
# augmentation depends only on its own flip and angle, so the batches are the same either way (tests). What
# it gains on a GPU, and the memory it costs (bench --memory), are in docs/performance.md.
GPU_CHUNK_IMAGES = 256


def chunk_steps(batch_size, device):
    return max(1, GPU_CHUNK_IMAGES // batch_size) if torch.device(device).type == "cuda" else 1


class TensorBatches(_Batches):
    def __init__(self, images, labels, ids, batch_size, train, device, shard=(0, 1), chunk=None,
                 max_angle=MAX_ANGLE, shift=0):
        super().__init__(len(images), labels, ids, batch_size, train, device, shard)
        self.max_angle, self.shift = max_angle, shift
        self.images = images.to(self.device)  # uint8 stays small: 12,500 images = 375 MB
        self.device_labels = None if labels is None else labels.to(self.device)
        self.chunk = chunk or chunk_steps(batch_size, self.device)  # steps gathered and augmented at once

    def plan(self, gen=None):
        plan = super().plan(gen)
        if self.train:  # every image's flip, angle and shift for the epoch, drawn at once on the CPU
            plan.update(draw_augment_params(self.n, gen, self.max_angle, shift=self.shift))
        return plan

    def batches(self, plan, gen=None, start=0):
        if self.train and "flips" not in plan:  # the per-image loader's plan: a run resumed with another --loader
            plan = {**plan, **draw_augment_params(self.n, gen, self.max_angle, shift=self.shift)}
        # This process's positions in the epoch, step after step from `start`, and how many each step takes (as
        # ranges: one tensor for the epoch, not two small ones per step); the plan in that order is copied to the
        # device once per epoch: no host-to-device copy (no wait) per step.
        spans = [range(self.n)[epoch_part][mine] for epoch_part, mine in self._batch_slices(start)]
        sizes = [len(r) for r in spans]
        positions = torch.tensor([i for r in spans for i in r], dtype=torch.long)
        mine = {k: v[positions] for k, v in plan.items()} if spans else {}
        on_device = {k: v.to(self.device) for k, v in mine.items()}
        lo = 0
        for first in range(0, len(sizes), self.chunk):  # a chunk of steps at a time (see GPU_CHUNK_IMAGES)
            steps = sizes[first:first + self.chunk]
            hi = lo + sum(steps)
            idx = on_device["order"][lo:hi]
            x = self.images.index_select(0, idx)  # much faster than images[idx] on a CPU
            if self.train:
                shifts = on_device["shifts"][lo:hi] if "shifts" in on_device else None
                x = augment_batch(x, on_device["flips"][lo:hi], on_device["angles"][lo:hi], shifts, self.shift)
            else:
                x = normalize(x)
            ys = [None] * len(steps) if self.device_labels is None else self.device_labels[idx].split(steps)
            yield from zip(x.split(steps), ys, mine["order"][lo:hi].split(steps))
            lo = hi


class ImageBatches(_Batches):
    def __init__(self, data, batch_size, train, device, workers=4, pin_memory=True, shard=(0, 1)):
        labels = None if data.labels is None else torch.tensor(data.labels)
        super().__init__(len(data), labels, data.ids, batch_size, train, device, shard)
        self.data, self.workers = data, workers
        self.pin_memory = pin_memory and self.device.type == "cuda"

    def batches(self, plan, gen=None, start=0):
        slices = [plan["order"][epoch_part][mine] for epoch_part, mine in self._batch_slices(start)]
        if not slices:
            return
        # Worker seeds come from `gen`, so a run with the same generator state augments the same way.
        loader = torch.utils.data.DataLoader(self.data, batch_sampler=[s.tolist() for s in slices],
                                             num_workers=self.workers, pin_memory=self.pin_memory,
                                             generator=gen, persistent_workers=False)
        for (x, _), idx in zip(loader, slices):
            y = None if self.labels is None else self.labels[idx].to(self.device, non_blocking=True)
            yield x.to(self.device, non_blocking=True), y, idx


_NOTES_GIVEN = set()


def make_batches(data_dir, split, batch_size, train, device, loader="tensors", cache_dir=None, workers=4,
                 pin_memory=True, max_memory_gb=4.0, shard=(0, 1), log=print, rows=None, max_angle=MAX_ANGLE,
                 shift=0, files=None, decoded=None):
    """The loader for one split (or for `rows` of it: --holdout's parts of train). loader: 'tensors' (fast,
    falls back to 'images' over the memory budget) or 'images' (the report's per-image path). max_angle and
    shift: the training augmentation's rotation (degrees) and shift (pixels). files: the split as check_data
    read it (else read here); decoded: {split: tensors} already decoded, which this adds to."""
    files = files or dataset.read_split(data_dir, split)
    if loader == "tensors":
        nbytes = dataset.split_nbytes(len(files.df))
        if nbytes <= max_memory_gb * 2**30:
            decoded = {} if decoded is None else decoded
            if split not in decoded:  # train and its held-out rows: decoded (or read from the cache) once
                decoded[split] = dataset.load_split_tensors(data_dir, split, cache_dir, log=log, files=files)
            data = decoded[split]
            images, labels, ids = data["images"], data["labels"], data["ids"]
            if rows is not None:
                rows_t = torch.as_tensor(rows, dtype=torch.long)
                images, labels, ids = images[rows_t], labels[rows_t], [ids[i] for i in rows]
            return TensorBatches(images, labels, ids, batch_size, train, device, shard, max_angle=max_angle,
                                 shift=shift)
        if (data_dir, split) not in _NOTES_GIVEN:  # a split loaded twice (to train, then to report) says it once
            _NOTES_GIVEN.add((data_dir, split))
            log(f"note: {split} ({nbytes / 2**20:,.0f} MB decoded) exceeds --max-memory-gb {max_memory_gb}; "
                "using the per-image loader")
    data = dataset.CsvImageDataset(data_dir, split, report_transform(train, max_angle, shift), rows, files)
    return ImageBatches(data, batch_size, train, device, workers, pin_memory, shard)


# ----------------------------------------------------------------------------------------------
# The loaders of a run

# Evaluation batch on a GPU: large batches keep it busy, but SkipConCNN holds 128 and 256 channels at 100x100,
# so at 256 images its evaluation needs ~3.1 GiB of tensors in fp16 (data and training state included):
# more than a GTX 1650's 4 GiB leaves after the CUDA context. 64 keeps every model under ~1.3 GiB
# (python -m tools.bench --memory; docs/performance.md).
EVAL_BATCH_GPU = {"three": 256, "skip": 64, "ensemble": 64}


def eval_batch_size(cfg, device):
    """--eval-batch-size, else EVAL_BATCH_GPU on a GPU and 16 on a CPU (measured fastest there: activations
    stay in cache; tools/bench.py, docs/performance.md)."""
    if cfg["eval_batch_size"]:
        return cfg["eval_batch_size"]
    if torch.device(device).type != "cuda":
        return 16
    return EVAL_BATCH_GPU.get(cfg["model"], min(EVAL_BATCH_GPU.values()))  # a vote may hold any model


def loaders_for(cfg, device, splits, train_split=None, sharded=True, data=None):
    """Loaders for `splits`; sharded: under torchrun each process gets its share of every batch. With --holdout,
    the training split loses its held-out rows, and "holdout" (a split name here) is those rows, judged as
    validation is. data: {split: SplitFiles} as check_data read them (else each split is read here)."""
    data = dict(data or {})
    kw = dict(device=device, loader=cfg["loader"], cache_dir=cfg["cache_dir"], workers=cfg["workers"],
              pin_memory=cfg["pin_memory"], max_memory_gb=cfg["max_memory_gb"], log=runtime.log,
              max_angle=cfg["rotate"], shift=cfg["shift"], decoded={})
    parts = {}
    if cfg["holdout"] and ("holdout" in splits or train_split == "train"):
        data["train"] = data.get("train") or dataset.read_split(cfg["data_dir"], "train")
        parts["train"], parts["holdout"] = dataset.holdout_split(data["train"].df["label"].to_numpy(), cfg["holdout"],
                                                                 cfg["seed"])
    out = {}
    for split in splits:
        train, on_disk = split == train_split, "train" if split == "holdout" else split
        bs = cfg["batch_size"] if train else eval_batch_size(cfg, device)
        out[split] = make_batches(cfg["data_dir"], on_disk, bs, train, rows=parts.get(split), files=data.get(on_disk),
                                  shard=(runtime.RANK, runtime.WORLD) if sharded else (0, 1), **kw)
    return out
