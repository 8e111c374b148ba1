"""Where a run executes: the device, the precision, the processes under torchrun, seeding, torch.compile.

RANK and WORLD are this process's place under torchrun (0 and 1 in a single process); other files read them
as runtime.RANK and runtime.WORLD, set once by setup_distributed.
"""
import os
import platform
import sys

import torch
import torch.distributed as dist

from errors import UserError

RANK, WORLD = 0, 1


def log(*a):
    """print, from the first process only (under torchrun every process runs the same code)."""
    if RANK == 0:
        print(*a, flush=True)


def progress(total, desc, cfg):
    """A tqdm bar on a terminal; none under --quiet, in a log file or in the other torchrun processes."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, unit="batch",
                disable=cfg["quiet"] or RANK != 0 or not sys.stdout.isatty())


# ==============================================================================================
# Device and processes

def sync(device):
    """Wait for the GPU's queued work (a no-op on a CPU): what a timing must do before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup_distributed(cfg):
    """Under torchrun: one process per GPU (or CPU process with gloo). Returns the device."""
    global RANK, WORLD
    want = cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        asked = torch.device(want)
    except RuntimeError:
        raise UserError(f"--device {want}: not a device: use cuda, cuda:N (the N-th GPU) or cpu")
    cuda = asked.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available: use --device cpu")
    if cuda and (asked.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {want}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                        f"cuda:{torch.cuda.device_count() - 1}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        per_machine, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
        if cuda and per_machine > gpus:  # every process checks, so none is left waiting for the others
            raise UserError(f"torchrun started {per_machine} processes on this machine, which has {gpus} GPU(s) "
                            f"(one process per GPU): use --nproc_per_node={gpus}, or --device cpu")
        dist.init_process_group("nccl" if cuda else "gloo")
        RANK, WORLD = dist.get_rank(), dist.get_world_size()
        if cuda:
            want = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(want)
    return torch.device(want)


def first_on_each_machine(work):
    """Under torchrun, the first process on each machine does `work` (decoding the splits, into the decode
    cache) while the others wait, then they do it, from the cache: not N processes decoding the same images
    at once on a first run. If the first one fails, torchrun stops the waiting ones."""
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if WORLD > 1 and not first:
        dist.barrier()
    out = work()
    if WORLD > 1 and first:
        dist.barrier()
    return out


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ==============================================================================================
# Precision

def cpu_has_bf16():
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype(cfg, device):
    """auto: bf16 on GPUs that have it, fp16 (+ GradScaler) on older ones like the GTX 1650, and on the CPU
    bf16 where it has native bf16 instructions (several times faster there; docs/performance.md) and fp32
    where it has not (emulated bf16 is slower than fp32)."""
    mode = cfg["amp"]
    if mode == "auto":
        if device.type == "cuda":
            # including_emulation=False: by default PyTorch also says yes to cards that only emulate bf16
            # (a GTX 1650, compute capability 7.5), where it is slow; those get fp16 and a GradScaler.
            mode = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        else:
            mode = "bf16" if cpu_has_bf16() else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


def device_note(cfg, device):
    """The line a run prints when it falls back to the CPU because no CUDA GPU was found (--device not given)."""
    if device.type != "cpu" or cfg["device"] is not None:
        return None
    return ("note: no CUDA GPU found (torch.cuda.is_available() is False), so this run trains on the CPU, where an "
            "epoch takes minutes to an hour instead of seconds (docs/performance.md). With an NVIDIA GPU, install "
            "PyTorch's CUDA build (README: Install); --minutes N fits a run to the time you have; --device cpu "
            "trains on the CPU without this note")


def precision_note(cfg, device, amp):
    """The line a run on a CPU without bf16 instructions prints once: it trains in fp32, and why."""
    if device.type != "cpu" or amp is not None or cfg["amp"] != "auto" or cpu_has_bf16():
        return None
    return ("note: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so it trains in fp32: bf16 emulated in "
            "software would be slower still. Expect several times the epoch time of a bf16 CPU, and a small "
            "fraction of it on a GPU, where the real speed is (docs/performance.md)")


# ==============================================================================================
# Reproducibility and compilation

def seed_everything(seed, deterministic):
    import random
    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)  # drives data order and augmentation
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    return gen


def compile_model(model, device):
    """torch.compile, as --compile does. On one GPU, "reduce-overhead" also replays the steps as CUDA graphs: at the
    report's small batches a step waits on launching its kernels, not on computing them (the measured gain is in
    docs/performance.md; the first epoch compiles). Not under DDP (its gradient hooks run outside the graphs) nor
    on a CPU (no CUDA graphs there)."""
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" and WORLD == 1 else None)
