"""Files that must never be torn or unsafe: atomic writes, checkpoint save/load, RNG state, names never taken.

Atomic write: write a temporary file in the same folder, flush + fsync, os.replace it into place.
A kill at any instant leaves the old file or the new one, never half of one.
Safe load: torch.load(..., weights_only=True) only, so a checkpoint cannot run code when loaded.
A checkpoint holds plain Python types and tensors only.
"""
import glob
import io
import os
import pickle
import pickletools
import random
import tempfile
import time

import numpy as np
import torch

from engine.errors import UserError

FORMAT = 1


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data: bytes):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    except OSError:
        pass
    remove_stale_temporaries(path)


STALE_S = 15 * 60  # a temporary this old belongs to a writer that was killed (a live one takes seconds)


def remove_stale_temporaries(path):
    """Temporaries of `path` left by a writer killed mid-write (SIGKILL, power loss): never read, only clutter."""
    pattern = os.path.join(glob.escape(os.path.dirname(os.path.abspath(path))),
                           f".{glob.escape(os.path.basename(path))}.*.tmp")
    for tmp in glob.glob(pattern):
        try:
            if time.time() - os.path.getmtime(tmp) > STALE_S:
                os.remove(tmp)
        except OSError:  # gone already, or not ours to remove
            pass


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def to_cpu(obj):
    """The same nesting of dicts, lists and tuples with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save(obj, path):
    """Tensors are saved from the CPU: a checkpoint written on a GPU then loads anywhere, also with a plain
    torch.load(path, weights_only=True) on a machine without one."""
    buf = io.BytesIO()
    torch.save(to_cpu(obj), buf)
    atomic_write_bytes(path, buf.getvalue())


def load(path, expect_model=None):
    """Load a checkpoint safely; one-line UserError for a missing, corrupt, unsafe or foreign file."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found: train that model first or pass the right path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if holds_pickled_code(path, str(e)):
            raise UserError(f"checkpoint {path} holds pickled code and was refused (nothing in it ran): "
                            f"use a checkpoint written by this project")
        raise UserError(f"{path} is not a checkpoint (corrupt or another kind of file): use a checkpoint "
                        f"written by this project (a run's best.pth and last.pth are kept separately)")
    except Exception as e:  # any other failure to parse (random bytes reach many code paths of the unpickler)
        raise UserError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}): use another checkpoint "
                        f"(a run's best.pth and last.pth are kept separately)")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project (no model/state_dict): pass one from "
                        f"models_pth/ or runs/")
    if expect_model is not None and ckpt["model"] != expect_model:
        raise UserError(f"checkpoint {path} holds a '{ckpt['model']}' model, not '{expect_model}': "
                        f"pass --model {ckpt['model']} or another checkpoint")
    return ckpt


def holds_pickled_code(path, message):
    """Whether a file that torch.load(weights_only=True) refused is a real pickle that names code to run (a
    class, a function), rather than bytes that are no pickle at all. Read with pickletools, which runs nothing."""
    if "Unsupported global" in message:
        return True
    try:
        with open(path, "rb") as f:
            ops = {op.name for op, _, _ in pickletools.genops(f)}
    except Exception:  # not a pickle stream: corrupt, or another kind of file
        return False
    return bool(ops & {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE"})


def load_weights(model, ckpt, path, key="state_dict"):
    """The weights ckpt[key] into `model`: the one place every path (resume, evaluate, the ensemble's bases)
    loads weights, so weights of another architecture are one line, wherever they come from."""
    try:
        model.load_state_dict(ckpt[key])
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"checkpoint {path} does not fit the '{ckpt['model']}' architecture "
                        f"({str(e).splitlines()[0][:80]}...): it was written by different code")


def eval_state(ckpt):
    """The weights a checkpoint is judged by: the EMA's when it has one."""
    return ckpt.get("ema_state_dict") or ckpt["state_dict"]


# ----------------------------------------------------------------------------------------------
# Random state of everything that draws random numbers (as plain types and tensors)

def rng_state(gen):
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "data": gen.get_state(),  # drives the data order and the augmentation
    }


def set_rng_state(state, gen):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    gen.set_state(state["data"])


def claim_new_path(base, ext, make):
    """The first of BASE.EXT, BASE-2.EXT, BASE-3.EXT ... that `make` creates. make (os.makedirs, or open with
    'x') fails on a taken name, so two processes never get the same one, even within one second."""
    k = 1
    while True:
        path = f"{base}{f'-{k}' if k > 1 else ''}{ext}"
        try:
            make(path)
            return path
        except FileExistsError:
            k += 1
