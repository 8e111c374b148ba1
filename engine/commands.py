"""The commands besides training: --summary (the layer table), --compare (a table of runs), --evaluate (the
classification report of a checkpoint, or of a soft vote), --predict (a submission) and --analyze (the errors
of a checkpoint, with pictures). Each imports PyTorch only once the flags are known to be good.
"""
import glob
import os

import dataloader
import dataset
import models
from engine import checkpoint, demo_data, folders, inference, report, runtime, whiten
from engine.errors import UserError
from engine.runtime import log


def run(args, cfg, given):
    """--summary, --compare, --evaluate, --predict, --analyze. Returns the exit code."""
    if args.summary:
        return summary(cfg)
    if args.compare is not None:
        return compare(args.compare, cfg)
    device = runtime.setup_distributed(cfg)
    amp = runtime.amp_dtype(cfg, device)
    runtime.seed_everything(cfg["seed"], cfg["deterministic"])
    demo_data.ensure_if_asked(cfg["data_dir"])
    expect = cfg["model"] if "model" in given else None
    target = args.evaluate or args.predict or args.analyze
    paths = args.ensemble_of if target == "vote" else [target]
    if target == "vote" and not args.ensemble_of:
        raise UserError("'vote' needs --ensemble-of CKPT CKPT ...")
    name = "vote" if target == "vote" else checkpoint.load(target, expect)["model"]
    cfg = {**cfg, "model": name}  # the model evaluated sets the GPU evaluation batch
    if args.analyze:  # each checkpoint judged as its run judged it, but for the flags given
        analyze(cfg, target, folders.command_dir(cfg, "analyze", name), device, amp, expect, given)
    elif args.evaluate:
        evaluate_checkpoints(cfg, paths, folders.command_dir(cfg, "evaluate", name), device, amp, expect_model=expect,
                             given=given)
    else:
        out = folders.command_dir(cfg, "predict", name)
        predict_checkpoints(cfg, paths, os.path.join(out, "submission.csv"), device, amp, expect, given)
    return 0


def summary(cfg):
    """The model's layer table (torchsummary) and its trainable parameters."""
    from torchsummary import summary as layer_table
    model = models.build_model(cfg["model"], cfg["full_res_width"])
    if cfg["whiten"]:  # its first convolution frozen (its filters need the data; the count does not)
        whiten.whiten_first_conv(model)
    layer_table(model, (3, dataset.IMAGE_SIZE, dataset.IMAGE_SIZE), device="cpu")
    print(f"trainable parameters: {models.count_params(model, True):,}")
    return 0


def compare(folders_given, cfg):
    """A table of finished runs: those given, or every run under --out-dir."""
    missing = [f for f in folders_given if not os.path.isdir(f)]
    if missing:
        raise UserError(f"--compare: {missing[0]} is not a folder: pass run folders (such as "
                        f"{cfg['out_dir']}/three-...) or none for every run under --out-dir")
    run_folders = folders_given or sorted(glob.glob(os.path.join(cfg["out_dir"], "*", "")))
    text, rows = report.compare_runs(run_folders)
    print(text if rows else f"no finished runs in {', '.join(run_folders) or cfg['out_dir']}")
    return 0


def evaluate_checkpoints(cfg, paths, out_dir, device, amp, title="", expect_model=None, given=None):
    va = dataloader.loaders_for(cfg, device, ["validation"], sharded=False)["validation"]
    probs, pos = inference.vote_probs(cfg, paths, va, device, amp, expect_model, given)
    rep = report.write_report(probs, pos, va, out_dir, title or ", ".join(paths), paths)
    return rep, probs, pos, va


def predict_checkpoints(cfg, paths, out_csv, device, amp, expect_model=None, given=None):
    te = dataloader.loaders_for(cfg, device, ["test"], sharded=False)["test"]
    probs, pos = inference.vote_probs(cfg, paths, te, device, amp, expect_model, given)
    report.write_submission(probs, pos, te, out_csv)


def analyze(cfg, path, out_dir, device, amp, expect_model=None, given=None):
    rep, probs, pos, va = evaluate_checkpoints(cfg, [path], out_dir, device, amp, f"analysis of {path}", expect_model,
                                               given)
    data = dataset.load_split_tensors(cfg["data_dir"], "validation", cfg["cache_dir"], log=log)
    y = va.labels[pos]
    loss = -probs.gather(1, y[:, None]).clamp_min(1e-12).log().squeeze(1)
    worst = loss.argsort(descending=True)[:32]
    conf, pred = probs.max(1)
    report.plot_gallery(data["images"][pos[worst]], y[worst].tolist(), pred[worst].tolist(), conf[worst].tolist(),
                        os.path.join(out_dir, "worst.png"), "highest-loss validation images: true->predicted (confidence)")
    report.plot_class_samples(data["images"], data["labels"].numpy(), os.path.join(out_dir, "samples.png"))
    lines = ["Most confused pairs (actual -> predicted: count)"]
    lines += [f"  {m['actual']} -> {m['predicted']}: {m['count']}" for m in rep["most_confused"]]
    lines.append(f"{'class':>6} {'precision':>10} {'recall':>8} {'f1':>8} {'support':>8}  mistaken most for")
    for c, m in rep["classes"].items():
        other = m["confused_most_with"]
        lines.append(f"{c:>6} {m['precision']:>10.3f} {m['recall']:>8.3f} {m['f1-score']:>8.3f} {int(m['support']):>8}"
                     f"  {'-' if other is None else other}")
    text = "\n".join(lines) + "\n"
    log(text)
    checkpoint.atomic_write_text(os.path.join(out_dir, "analysis.txt"), text)
    log(f"pictures: {os.path.join(out_dir, 'worst.png')}, {os.path.join(out_dir, 'samples.png')}")
