"""What a run shows and leaves behind: the report (text + JSON), the submission CSV, the pictures,
the error analysis and the comparison of runs. Every file is written atomically."""
import csv
import io
import json
import os

import numpy as np

from engine.checkpoint import atomic_write_bytes, atomic_write_text
from engine.recipes import NUM_CLASSES
from engine.runtime import log

CLASSES = [str(k) for k in range(NUM_CLASSES)]


# ----------------------------------------------------------------------------------------------
# The classification report

def build_report(y_true, y_pred):
    """accuracy, sklearn's per-class precision/recall/F1, the confusion matrix and the worst confusions."""
    from sklearn.metrics import classification_report, confusion_matrix  # here: its import takes a second
    labels = list(range(len(CLASSES)))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    per_class = classification_report(y_true, y_pred, labels=labels, target_names=CLASSES, output_dict=True,
                                      zero_division=0)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    pairs = sorted(((int(off[a, p]), a, p) for a in labels for p in labels if off[a, p]), reverse=True)
    for a in labels:  # the class each class is mistaken for most (the report's class-4 question)
        row = off[a]
        per_class[CLASSES[a]]["confused_most_with"] = int(row.argmax()) if row.any() else None
    return {
        "accuracy": float((np.asarray(y_true) == np.asarray(y_pred)).mean()),
        "n": int(len(y_true)),
        "classes": {c: per_class[c] for c in CLASSES},
        "macro avg": per_class["macro avg"],
        "confusion_matrix": cm.tolist(),
        "most_confused": [{"actual": a, "predicted": p, "count": n} for n, a, p in pairs[:5]],
    }


def confusion_box(cm):
    """The confusion matrix boxed as in the report: actual classes down, predicted across."""
    cm = np.asarray(cm)
    w = max(5, len(str(cm.max())) + 2)
    line = "+" + "-" * 10 + ("+" + "-" * w) * cm.shape[1] + "+"
    out = ["Confusion matrix (rows: actual, columns: predicted)", line,
           "|" + " actual\\pr".ljust(10) + "".join("|" + str(k).center(w) for k in range(cm.shape[1])) + "|", line]
    for a, row in enumerate(cm):
        out.append("|" + f" {a}".ljust(10) + "".join("|" + str(v).rjust(w - 1) + " " for v in row) + "|")
    out.append(line)
    return "\n".join(out)


def report_text(rep, y_true, y_pred, title=""):
    from sklearn.metrics import classification_report
    cls = classification_report(y_true, y_pred, labels=list(range(len(CLASSES))), target_names=CLASSES,
                                digits=4, zero_division=0)
    lines = [title, f"Validation accuracy: {rep['accuracy'] * 100:.2f}% ({rep['n']} images)", "",
             confusion_box(rep["confusion_matrix"]), "", "Classification report", cls,
             "Per class: recall, and the class it is mistaken for most"]
    for c, m in rep["classes"].items():
        other = m["confused_most_with"]
        lines.append(f"  class {c}: recall {m['recall']:.3f}" + (f", mistaken most for {other}" if other is not None else ""))
    return "\n".join(l for l in lines if l is not None).strip("\n") + "\n"


def save_report(rep, text, folder, name="report"):
    atomic_write_text(os.path.join(folder, f"{name}.txt"), text)
    atomic_write_text(os.path.join(folder, f"{name}.json"), json.dumps(rep, indent=2))


def write_report(probs, pos, va, out_dir, title, paths):
    """The classification report of validation probabilities: printed, saved as text and JSON, and drawn."""
    y, pred = va.labels[pos].numpy(), probs.argmax(1).numpy()
    rep = build_report(y, pred)
    rep["checkpoints"] = list(paths)
    text = report_text(rep, y, pred, title)
    log(text)
    save_report(rep, text, out_dir)
    draw(plot_confusion, rep, os.path.join(out_dir, "confusion.png"))
    log(f"report: {os.path.join(out_dir, 'report.txt')} (+ report.json, confusion.png)")
    return rep


def write_submission(probs, pos, te, out_csv):
    """The submission CSV: the predicted class of each test image (probabilities in the order `pos` gives), with
    test.csv's ids, in test.csv's order."""
    ids = [te.ids[i] for i in pos.tolist()]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image_id", "label"])
    w.writerows(zip(ids, (int(p) for p in probs.argmax(1).tolist())))
    atomic_write_text(out_csv, buf.getvalue())
    log(f"submission: {out_csv} ({len(ids)} rows, test.csv order)")


# ----------------------------------------------------------------------------------------------
# Pictures (matplotlib, no display needed)

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_fig(fig, path):
    # tight_layout fits the labels into the figure's own size; bbox_inches="tight" would draw the figure twice to
    # crop it, which took 2-3x as long (a run's two pictures ~0.3 s against ~0.8 s on a 2-core CPU).
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_confusion(rep, path):
    plt = _plt()
    cm = np.asarray(rep["confusion_matrix"], dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    from sklearn.metrics import ConfusionMatrixDisplay
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, m, title, fmt in [(axes[0], cm, "counts", ".0f"), (axes[1], norm, "row-normalised (recall)", ".2f")]:
        ConfusionMatrixDisplay(m, display_labels=CLASSES).plot(ax=ax, cmap="Blues", values_format=fmt, colorbar=False)
        ax.set(title=title, xlabel="predicted", ylabel="actual")
    fig.suptitle(f"Validation accuracy {rep['accuracy'] * 100:.2f}%")
    _save_fig(fig, path)


def draw(plot, *args):
    """Pictures are extras: one that cannot be drawn (a broken matplotlib, say) is a note, not a lost submission.
    The last argument is the picture's path."""
    try:
        plot(*args)
    except Exception as e:
        print(f"note: could not draw {args[-1]} ({type(e).__name__}: {e})", flush=True)


def read_log(path):
    """log.csv's rows as numbers (a column a run does not have, such as holdout_acc without --holdout: None)."""
    with open(path, newline="") as f:
        return [{k: float(v) if v not in ("", None) else None for k, v in row.items()} for row in csv.DictReader(f)]


def plot_curves(log_csv, path):
    plt = _plt()
    rows = read_log(log_csv)
    ep = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(ep, [r["train_loss"] for r in rows], label="train")
    axes[0].plot(ep, [r["val_loss"] for r in rows], label="validation")
    axes[1].plot(ep, [100 * r["train_acc"] for r in rows], label="train")
    axes[1].plot(ep, [100 * r["val_acc"] for r in rows], label="validation")
    if rows and rows[-1].get("holdout_acc") is not None:
        axes[1].plot(ep, [100 * r["holdout_acc"] for r in rows], label="held-out train rows")
    axes[2].plot(ep, [r["lr"] for r in rows])
    if any(r["lr"] > 0 for r in rows):  # a log scale needs a positive value (a run logged at rate 0 has none)
        axes[2].set_yscale("log")
    for ax, t in zip(axes, ["loss", "accuracy (%)", "learning rate"]):
        ax.set(title=t, xlabel="epoch")
    axes[0].legend()
    axes[1].legend()
    _save_fig(fig, path)


def plot_gallery(images, true, pred, conf, path, title):
    """A grid of uint8 images (N,3,H,W) captioned 'true -> predicted (confidence)'."""
    plt = _plt()
    n = len(images)
    cols = min(8, max(n, 1))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(np.asarray(images[k]).transpose(1, 2, 0))
            cap = f"{true[k]}" if pred is None else f"{true[k]}->{pred[k]} ({conf[k]:.2f})"
            ax.set_title(cap, fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save_fig(fig, path)


def plot_class_samples(images, labels, path, per_class=8):
    labels = np.asarray(labels)
    picks = [i for c in range(len(CLASSES)) for i in np.flatnonzero(labels == c)[:per_class]]
    plot_gallery(images[picks], labels[picks], None, None, path, "sample images per class (rows: classes 0-4)")


# ----------------------------------------------------------------------------------------------
# Comparing finished runs

def compare_runs(folders):
    rows = []
    for d in folders:
        try:
            with open(os.path.join(d, "report.json")) as f:
                rep = json.load(f)
            with open(os.path.join(d, "config.json")) as f:
                cfg = json.load(f)
            log = read_log(os.path.join(d, "log.csv"))
        except (OSError, ValueError):
            continue  # not a finished training run
        rows.append((os.path.basename(os.path.normpath(d)), cfg.get("model", "?"), rep["accuracy"] * 100,
                     rep["classes"]["4"]["recall"], len(log), sum(r["seconds"] for r in log) / 60,
                     cfg.get("device_name", "?")))
    head = f"{'run':<34} {'model':<9} {'val acc':>8} {'recall 4':>9} {'epochs':>7} {'minutes':>8}  device"
    out = [head, "-" * len(head)]
    out += [f"{r:<34} {m:<9} {a:>7.2f}% {c4:>9.3f} {e:>7d} {t:>8.1f}  {dev}" for r, m, a, c4, e, t, dev in rows]
    return "\n".join(out) + "\n", rows
