"""GPU memory on the users' 4 GB card (a GTX 1650), counted without a GPU: the peak tensor memory of each model
and preset as main.py trains and evaluates it on a GPU, from two training steps and one evaluation batch run on
fake tensors (shapes, no data). The figures are in docs/performance.md.

    python -m tools.gpu_memory                 every preset and model (seconds, no GPU)
    python -m tools.bench --memory             the same, as the benchmark's last table
"""
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import dataloader
import main
import models
from engine import inference
from engine import recipes
from engine import trainstep
from engine import whiten
from engine.state import build

# The competition's split sizes: the fast path keeps all three decoded on the GPU, as uint8.
REAL_SPLITS = {"train": 12_500, "validation": 1_250, "test": 1_000}
# A GTX 1650 has 4 GiB. The CUDA context (~0.3-0.4 GiB) lies outside PyTorch's allocator, and the caching
# allocator and cuDNN's workspaces need slack, so up to 3 GiB of tensors is taken as fitting.
FITS_MIB = 3072
# Every model, in the table's order.
MODELS = ("three", "skip", "ensemble", "res")


class PeakMemory(TorchDispatchMode):
    """Bytes of tensor storage alive after each operation run inside, and the most at any one time.
    Under FakeTensorMode tensors have shapes and dtypes but no data: nothing is computed or allocated, so a
    SkipConCNN step at any batch size is counted in milliseconds, on any machine."""

    def __init__(self):
        super().__init__()
        self.sizes, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            s = t.untyped_storage() if isinstance(t, torch.Tensor) else None
            if s is not None and id(s) not in self.sizes:  # views and in-place results share a storage: once
                self.sizes[id(s)] = s.nbytes()
                self.now += s.nbytes()
                weakref.finalize(s, self._freed, id(s))  # counted until the storage is freed
        self.peak = max(self.peak, self.now)
        return out

    def _freed(self, key):
        self.now -= self.sizes.pop(key)


def estimate_memory(name, preset, amp=torch.float16, eval_batch=None):
    """Peak tensor memory (MiB) of `name` under `preset` as main.py runs it on a GPU with the fast path: the
    three splits resident as uint8, the model, the preset's optimizer's state, the EMA copy, gradients,
    activations and the batch augmentation for a training step; evaluation at main.py's GPU batch (with TTA
    where the preset has it), the training state still alive beside it. fp16: the GTX 1650 has no bf16. Not
    counted: mixup/cutmix (one more batch) and the GradScaler (a few scalars)."""
    cfg = {**recipes.resolve_config(main.parse_args(["--model", name, "--preset", preset]))[0], "quiet": True}
    cpu = torch.device("cpu")
    batch, eval_batch = cfg["batch_size"], eval_batch or dataloader.eval_batch_size(cfg, "cuda")
    gen = torch.Generator().manual_seed(0)
    real_constants = dict(dataloader._NORM)  # normalize()'s cached constants: fake ones must not outlive this
    dataloader._NORM.clear()
    try:
        with FakeTensorMode(), PeakMemory() as mem:
            data = torch.zeros(sum(REAL_SPLITS.values()), 3, 100, 100, dtype=torch.uint8)
            labels = torch.zeros(len(data), dtype=torch.long)
            data_mib = mem.now / 2**20
            # channels_last: same sizes (FakeTensorMode cannot convert modules)
            model = models.build_model(name, cfg["full_res_width"])
            if cfg["whiten"]:  # frozen as the run trains it: no gradient for its weights
                whiten.whiten_first_conv(model)
            ema = [t.clone() for t in model.state_dict().values()] if cfg["ema"] else None  # AveragedModel's copy
            chunk = dataloader.chunk_steps(batch, "cuda")  # augmented as on the GPU: several steps' images at once
            state = build({**cfg, "ema": 0.0}, model, cpu, amp, False, 100, compile=False, ddp=False)
            state.scaler = torch.amp.GradScaler("cpu", enabled=False)  # it reads values: fake tensors have none
            train = dataloader.TensorBatches(data, labels, None, batch, True, cpu, chunk=chunk)
            batches = train.batches(train.plan(gen), gen)
            model.train()
            for _ in range(2):  # the second step has the optimizer's state from the first
                trainstep.step(state, *next(batches)[:2])
            train_mib, mem.peak = mem.peak / 2**20, mem.now
            eval_batches = dataloader.TensorBatches(data[:eval_batch], labels[:eval_batch], None, eval_batch, False, cpu)
            inference.predict_probs(model, eval_batches, cfg, cpu, amp, cfg["tta"])
            del ema
    finally:
        dataloader._NORM.clear()
        dataloader._NORM.update(real_constants)
    return {"preset": preset, "model": name, "batch": batch, "eval_batch": eval_batch, "data_mib": data_mib,
            "train_peak_mib": train_mib, "eval_peak_mib": mem.peak / 2**20,
            "fits_4gb": max(train_mib, mem.peak / 2**20) <= FITS_MIB}


def memory_table(names=MODELS):
    rows = [estimate_memory(name, preset) for preset in recipes.PRESETS for name in names
            if name in recipes.PRESET_MODELS.get(preset, names)]
    print(f"\nGPU memory, fp16, counted without a GPU (tensors only; 4 GB card = up to {FITS_MIB} MiB of tensors):")
    for r in rows:
        print(f"  --preset {r['preset']:<6} {r['model']:<9} train batch {r['batch']:>3}: {r['train_peak_mib']:6.0f} MiB"
              f"   eval batch {r['eval_batch']:>3}: {r['eval_peak_mib']:6.0f} MiB   (data {r['data_mib']:.0f} MiB)"
              f"   {'fits' if r['fits_4gb'] else 'DOES NOT FIT'}")
    return rows


if __name__ == "__main__":
    memory_table()
