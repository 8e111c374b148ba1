"""Where a run executes: the device, the precision, the processes under torchrun, seeding, torch.compile.

RANK and WORLD are this process's place under torchrun (0 and 1 in a single process); other files read them
as runtime.RANK and runtime.WORLD, set once by setup_distributed.
"""
import os
import platform
import sys

import torch
import torch.distributed as dist

from engine.errors import UserError

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
    """Whether the CPU computes bf16 natively, as the library itself decides it (oneDNN: AVX512-BF16, AMX, or
    AVX-512's BW/VL/DQ on which it runs bf16 fast); on Linux, macOS and Windows alike. With ONEDNN_MAX_CPU_ISA=AVX2
    it says no, as on a laptop CPU with AVX2 only."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def machine(device):
    """What a measured choice of precision and layout holds for: the GPU and its compute capability, or the CPU's
    kernels (its instruction set as PyTorch uses it, bf16 or not) and threads. A run resumed elsewhere chooses anew."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    return (f"CPU {platform.machine()}, {torch.backends.cpu.get_cpu_capability()}"
            f"{', bf16' if cpu_has_bf16() else ''}, {torch.get_num_threads()} threads")


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
PRECISION_NAMES = {"bf16": "bf16", "fp16": "fp16 + GradScaler", "off": "fp32"}


def native_precisions(device):
    """The precisions this device computes natively, the likely fastest first; --amp auto times them (never fp16
    without its GradScaler, which every fp16 run here has). GPUs: bf16 where native (Ampere and newer), fp16 (a
    GTX 1650 has fp16 but emulates bf16: including_emulation=False, else PyTorch says yes to it) and fp32. CPUs:
    bf16 where the library says it is native, and fp32 (emulated bf16 is slower than fp32, ~20x a convolution)."""
    if device.type == "cuda":
        return (["bf16"] if torch.cuda.is_bf16_supported(including_emulation=False) else []) + ["fp16", "off"]
    return (["bf16"] if cpu_has_bf16() else []) + ["off"]


def check_precision(mode, device):
    """A precision this device cannot run at all is one line (bf16 on a GPU that cannot even emulate it)."""
    if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=True):
        raise UserError(f"--amp bf16: {torch.cuda.get_device_name(device)} cannot compute in bf16: use --amp auto "
                        f"(it measures fp16 and fp32 here)")


def precision(cfg, device):
    """'bf16', 'fp16' or 'off' (fp32): --amp as given; for auto, the run's measured choice where it was made on this
    machine (cfg['chosen'], budget.py), else the first native one (commands that judge a checkpoint elsewhere)."""
    mode = cfg["amp"]
    if mode == "auto":
        chosen = cfg.get("chosen")
        mode = chosen["amp"] if chosen and chosen["on"] == machine(device) else native_precisions(device)[0]
    return mode


def amp_dtype(cfg, device):
    """The autocast dtype of precision(): torch.bfloat16, torch.float16 (+ GradScaler) or None (fp32)."""
    return DTYPES[precision(cfg, device)]


def dtype_name(amp):
    """An autocast dtype as the lines a run prints say it: bfloat16, float16 or fp32 (None)."""
    return str(amp).replace("torch.", "") if amp else "fp32"


def channels_last(cfg, device):
    """Whether the model and its inputs are channels_last: --channels-last as given; for auto, the run's measured
    choice where it was made on this machine, else channels_last."""
    cl = cfg["channels_last"]
    if cl == "auto":
        chosen = cfg.get("chosen")
        return chosen["channels_last"] if chosen and chosen["on"] == machine(device) else True
    return bool(cl)


def device_note(cfg, device):
    """The line a run prints when it falls back to the CPU because no CUDA GPU was found (--device not given)."""
    if device.type != "cpu" or cfg["device"] is not None:
        return None
    return ("note: no CUDA GPU found (torch.cuda.is_available() is False), so this run trains on the CPU, where an "
            "epoch takes minutes to an hour instead of seconds (docs/performance.md). With an NVIDIA GPU, install "
            "PyTorch's CUDA build (README: Install); --minutes N fits a run to the time you have; --device cpu "
            "trains on the CPU without this note")


def precision_note(cfg, device, amp):
    """The line a run prints once where its precision is not native here: a CPU without bf16 training in fp32
    under --amp auto (why), or a precision asked for that this machine only emulates (what it costs)."""
    mode = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}[amp]
    if device.type == "cpu" and mode == "off" and cfg["amp"] == "auto" and not cpu_has_bf16():
        return ("note: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so it trains in fp32: bf16 emulated "
                "in software would be slower still. Expect several times the epoch time of a bf16 CPU, and a small "
                "fraction of it on a GPU, where the real speed is (docs/performance.md)")
    if mode == "off" or mode in native_precisions(device):
        return None
    if device.type == "cpu" and mode == "fp16":
        return ("note: --amp fp16 on a CPU runs a GTX 1650's code path (fp16 autocast + GradScaler) in emulation: "
                "one ThreeCNN step at batch 16 took ~30 s on a 2-core AVX512-BF16 CPU, against ~0.1 s in bf16. "
                "For checking that path, not for training: --amp auto measures what is fast here")
    where = "this CPU" if device.type == "cpu" else torch.cuda.get_device_name(device)
    return (f"note: --amp {mode}: {where} emulates {mode}, which runs several times slower than fp32 there (a bf16 "
            f"convolution ~20x on an AVX2 CPU): --amp auto measures what is fast here")


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
