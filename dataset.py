"""The competition data on disk: split CSVs, image files, decoding, and the decode-once cache.

Layout (the Kaggle download):  DATA/train.csv, DATA/validation.csv (image_id,label), DATA/test.csv (image_id),
and DATA/<split>/<image_id>.png. Files in another format Pillow reads (WebP, JPEG) are found too.
Every problem a user can cause raises UserError with one line that names the file and the fix.
PyTorch is imported where tensors are made, not here: main.py checks the data before it imports PyTorch.
"""
import hashlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from engine import locks
from engine.errors import UserError  # noqa: F401 (raised here, and imported from here by others)
from engine.recipes import NUM_CLASSES

IMAGE_SIZE = 100
SPLITS = ("train", "validation", "test")


# ----------------------------------------------------------------------------------------------
# CSV reading and checking

def read_split_csv(data_dir, split):
    """The split's CSV as a DataFrame with str image_id (and int label for train/validation), checked."""
    path = os.path.join(data_dir, f"{split}.csv")
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UserError(f"--data-dir {data_dir} is a file, not a folder: pass the folder that holds train.csv, "
                        f"validation.csv, test.csv and the image folders")
    if not os.path.isdir(data_dir):
        raise UserError(f"data folder {data_dir} not found: put the Kaggle download there or pass --data-dir "
                        f"(or try --demo)")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: the data folder needs train.csv, validation.csv and test.csv")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is empty or not a CSV ({str(e).splitlines()[0]}): restore it from the download")
    labelled = split != "test"
    needed = ["image_id", "label"] if labelled else ["image_id"]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise UserError(f"{path} has no column {', '.join(missing)} (found: {', '.join(df.columns) or 'none'}): "
                        f"the header must be '{','.join(needed)}'")
    if len(df) == 0:
        raise UserError(f"{path} has a header but no rows: restore it from the download")
    df["image_id"] = df["image_id"].str.strip()
    empty = df.index[df["image_id"] == ""]
    if len(empty):
        raise UserError(f"{path} row {empty[0] + 2} has an empty image_id: fix or delete that row")
    dup = df["image_id"].duplicated()
    if dup.any():
        first = df.index[dup][0]
        raise UserError(f"{path} row {first + 2}: image_id {df.image_id[first]} appears more than once "
                        f"({int(dup.sum())} duplicates): each image must be listed once")
    if labelled:
        ok = df["label"].str.strip().isin([str(k) for k in range(NUM_CLASSES)])
        if not ok.all():
            bad = df.index[~ok][0]
            raise UserError(f"{path} row {bad + 2}: label {df.label[bad]!r} is not an integer in 0..{NUM_CLASSES - 1}: "
                            f"fix that row")
        df["label"] = df["label"].astype(int)
    return df[needed].reset_index(drop=True)


class SplitFiles(NamedTuple):
    """A split as read and checked on disk: its CSV's rows, its image files, and two digests (of the rows, and of
    the files' names, sizes and times: the decode cache's key)."""
    df: pd.DataFrame
    paths: list
    digest: str
    files: str


def read_split(data_dir, split):
    df = read_split_csv(data_dir, split)
    paths = find_images(data_dir, split, df["image_id"].tolist())
    return SplitFiles(df, paths, hashlib.sha256(df.to_csv(index=False).encode()).hexdigest()[:16],
                      _cache_key(data_dir, split, paths))


def check_data(data_dir):
    """Fail in seconds, not after 200 epochs: every CSV and image file is checked before training. Returns
    {split: SplitFiles}: read once, a run's loaders are made from it."""
    return {split: read_split(data_dir, split) for split in SPLITS}


def resume_digests(data):
    """What a resumed run must find again: {split: [rows, digest of its rows, digest of its files]} for train and
    validation (saved in its checkpoints)."""
    return {split: [len(f.df), f.digest, f.files] for split, f in data.items() if split != "test"}


def holdout_split(labels, fraction, seed):
    """(rows to train on, rows held out): `fraction` of each class held out, drawn with `seed`, both sorted.
    Stratified, so the held-out rows have the classes in train.csv's proportions; the same labels, fraction
    and seed always give the same split (a resumed run finds its own again). Not sklearn's
    train_test_split(stratify=...): it draws other rows for the same seed, and every screening figure in
    docs/results.csv was judged on these."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = [rng.permutation(np.flatnonzero(labels == c))[:round(fraction * (labels == c).sum())]
            for c in range(NUM_CLASSES)]
    held = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), held), held


# ----------------------------------------------------------------------------------------------
# Finding and decoding images

def find_images(data_dir, split, ids):
    """Path of each image: <split>/<id>.png, or <split>/<id>.<any extension> when no PNG is there."""
    folder = os.path.join(data_dir, split)
    if not os.path.isdir(folder):
        raise UserError(f"image folder {folder} not found: {split}.csv lists images that should be in it")
    by_stem = {}
    with os.scandir(folder) as it:
        for entry in it:  # files only: a folder, or a link to a file that is gone, is no image (counted missing)
            if not entry.is_file():
                continue
            stem, ext = os.path.splitext(entry.name)
            if stem not in by_stem or ext.lower() == ".png":  # prefer the Kaggle PNG
                by_stem[stem] = entry.name
    missing = [i for i in ids if i not in by_stem]
    if missing:
        raise UserError(f"{len(missing)} image(s) listed in {os.path.join(data_dir, split + '.csv')} are missing "
                        f"from {folder} (first: {', '.join(missing[:3])}): restore them or remove their rows")
    return [os.path.join(folder, by_stem[i]) for i in ids]


# What Pillow raises for a file it cannot decode: not an image, truncated, unreadable (permissions, a folder),
# over its size limit (a "decompression bomb"), or one of its warnings turned into an error (python -W error).
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError, Warning)


def to_rgb(im):
    """RGB of any mode. 16-bit grayscale (mode I;16, I) is scaled to 8 bits first: Pillow's own conversion
    clips every value above 255, which turns such an image almost white."""
    if im.mode.startswith("I"):
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    return im.convert("RGB")


def decode_image(path):
    """RGB PIL image of IMAGE_SIZE x IMAGE_SIZE (grayscale/RGBA/palette converted, other sizes resized)."""
    try:
        with Image.open(path) as im:
            im = to_rgb(im)  # also forces the full decode, so a truncated file fails here
    except DECODE_ERRORS as e:
        raise UserError(f"{path} cannot be read as an image ({type(e).__name__}): replace it with the original "
                        f"or remove its row from the CSV")
    if im.size != (IMAGE_SIZE, IMAGE_SIZE):
        im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return im


class CsvImageDataset:
    """One image at a time from disk (the report's path): (image, label), or (image, image_id) for test.
    A map-style dataset for torch's DataLoader (it needs only __len__ and __getitem__)."""

    def __init__(self, data_dir, split, transform=None, rows=None, files=None):
        df, paths, _, _ = files or read_split(data_dir, split)
        if rows is not None:  # a part of the split (--holdout): these rows, in this order
            df, paths = df.iloc[rows].reset_index(drop=True), [paths[i] for i in rows]
        self.split = split
        self.ids = df["image_id"].tolist()
        self.labels = df["label"].tolist() if "label" in df else None
        self.paths = paths
        self.transform = transform

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        image = decode_image(self.paths[i])
        if self.transform is not None:
            image = self.transform(image)
        return image, (self.labels[i] if self.labels is not None else self.ids[i])


# ----------------------------------------------------------------------------------------------
# Decode once: a split as one uint8 tensor (N, 3, 100, 100), cached on disk
#
# Why: decoding PNGs with Pillow every epoch costs more than training ThreeCNN on a GPU. A split is
# small (12,500 x 30 KB = 375 MB), so decode it once, keep it in memory (or on the GPU) and cache it.

def split_nbytes(n):
    return n * 3 * IMAGE_SIZE * IMAGE_SIZE


CACHE_FORMAT = 2  # part of the cache's key: a cache written in another layout is never read, but decoded again


def _cache_key(data_dir, split, paths):
    h = hashlib.sha256(f"format {CACHE_FORMAT}\n".encode())
    with open(os.path.join(data_dir, f"{split}.csv"), "rb") as f:
        h.update(f.read())
    for p in paths:  # a changed, added or replaced image changes its size or mtime
        st = os.stat(p)
        h.update(f"{os.path.basename(p)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _writable(path):
    # Check the mode's write bits too: root passes os.access on a folder marked read-only.
    return os.access(path, os.W_OK) and bool(os.stat(path).st_mode & 0o222)


def default_cache_dir(data_dir):
    """DATA/.cache when the data folder is writable, else a per-user cache folder."""
    inside = os.path.join(data_dir, ".cache")
    if _writable(data_dir) and (not os.path.exists(inside) or _writable(inside)):
        return inside
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "deepfake-unibuc", hashlib.sha256(os.path.abspath(data_dir).encode()).hexdigest()[:12])


def _read_cache(path, ids):
    """The cached split if `path` holds it whole and in this layout, else None (a damaged or foreign cache is
    only a cache: it is decoded again)."""
    import torch
    if not os.path.isfile(path):
        return None
    try:
        data = torch.load(path, weights_only=True)
        images, labels = data["images"], data["labels"]
        if (data["ids"] == ids and images.dtype == torch.uint8 and tuple(images.shape) == (len(ids), 3, IMAGE_SIZE,
                                                                                          IMAGE_SIZE)
                and (labels is None or tuple(labels.shape) == (len(ids),))):
            return data
    except Exception:
        pass
    return None


def load_split_tensors(data_dir, split, cache_dir=None, threads=None, log=print, files=None):
    """{"images": uint8 (N,3,100,100), "labels": int64 (N,) or None, "ids": [str]}, decoded once then cached.
    One decoder at a time per split and cache folder: runs started together wait for the first one's cache.
    files: the split's SplitFiles where already read (check_data), else it is read here."""
    df, paths, _, key = files or read_split(data_dir, split)
    ids = df["image_id"].tolist()
    cache_dir = cache_dir or default_cache_dir(data_dir)
    cache = os.path.join(cache_dir, f"{split}-{key}.pt")
    data = _read_cache(cache, ids)
    if data is not None:
        return data
    try:
        os.makedirs(cache_dir, exist_ok=True)
        lock = locks.acquire(os.path.join(cache_dir, f".{split}.lock"))
    except OSError:  # an unwritable cache folder: decode without it (noted when the cache cannot be written)
        lock = None
    try:
        data = _read_cache(cache, ids) if lock is not None else None  # another run's, made while this one waited
        if data is None:
            data = _decode_split(df, ids, paths, split, cache_dir, threads, log)
            _write_cache(data, cache, split, log)
        return data
    finally:
        if lock is not None:
            locks.release(lock)


def _decode_split(df, ids, paths, split, cache_dir, threads, log):
    import torch
    log(f"decoding {len(ids)} {split} images once (cached in {cache_dir}) ...")
    images = torch.empty((len(ids), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)

    def decode_into(i):  # Pillow releases the GIL while decoding, so threads help
        images[i] = torch.from_numpy(np.asarray(decode_image(paths[i])).copy()).permute(2, 0, 1)

    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(decode_into, range(len(ids))))
    labels = torch.tensor(df["label"].to_numpy(), dtype=torch.int64) if "label" in df else None
    return {"images": images, "labels": labels, "ids": ids}


def _write_cache(data, cache, split, log):
    """The cache written beside a temporary and moved into place whole; under the split's lock, so the caches of
    this split that are not this one, and any temporaries (of writers that died: the live one holds the lock),
    are removed."""
    import torch
    cache_dir = os.path.dirname(cache)
    try:
        for old in os.listdir(cache_dir):
            stale_cache = old.startswith(f"{split}-") and old.endswith(".pt") and old != os.path.basename(cache)
            if stale_cache or (old.startswith(f".{split}-") and old.endswith(".tmp")):
                try:
                    os.remove(os.path.join(cache_dir, old))
                except FileNotFoundError:  # another process (torchrun) removed it first
                    pass
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{split}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(data, f)
            os.replace(tmp, cache)
        except BaseException:  # a disk that filled up mid-write: leave it no half-written 375 MB behind
            os.remove(tmp)
            raise
    except OSError as e:
        log(f"note: could not write the decode cache in {cache_dir} ({e.strerror}); it will be decoded again next run")
