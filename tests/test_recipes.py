"""Beyond the report's recipe: TTA, EMA, class weights, focal loss, mixup/cutmix, soft votes, presets."""
import json

import pytest
import torch
import torch.nn.functional as F

from engine import checkpoint
import dataloader
from engine import inference
from engine import loss
import main
import models
from engine import recipes
from dataset import UserError
from conftest import base_args


@pytest.fixture(scope="module")
def ema_run(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ema")
    assert main.main([str(a) for a in base_args(tiny_data, tmp, "--ema", "0.9", "--epochs", "2")]) == 0
    return tmp, tmp / "runs" / "r"


def test_tta_averages_the_softmax_over_its_views(tiny_data, tmp_path):
    torch.manual_seed(0)
    model = models.ThreeCNN().eval()
    batches = dataloader.make_batches(tiny_data, "validation", 8, False, "cpu", cache_dir=str(tmp_path),
                                      log=lambda *a: None)
    cfg = {**recipes.DEFAULTS, "quiet": True}
    probs, pos, _, _ = inference.predict_probs(model, batches, cfg, torch.device("cpu"), None, tta=True)
    x, _, _ = next(batches.batches(batches.plan()))
    views = dataloader.tta_views(x)
    assert len(views) == 4 and torch.equal(views[1], x.flip(3))
    with torch.no_grad():
        manual = sum(model(v).softmax(1) for v in views) / 4
    assert torch.allclose(probs[:8], manual, atol=1e-5)


def test_tta_rotated_views_fill_black():
    x = dataloader.normalize(torch.full((1, 3, 100, 100), 255, dtype=torch.uint8))
    corner = dataloader.tta_views(x)[2][0, :, 0, 0]
    assert torch.allclose(corner, dataloader.normalize(torch.zeros(1, 3, 1, 1))[0, :, 0, 0], atol=1e-5)


def test_ema_weights_are_kept_and_judged(ema_run, tiny_data, run_main, monkeypatch):
    """The EMA's weights are saved beside the trained ones, and --evaluate judges them: the model it builds holds
    the EMA's weights, and its report's probabilities are the EMA model's."""
    tmp, run = ema_run
    ck = torch.load(run / "best.pth", weights_only=True)
    ema, raw = ck["ema_state_dict"], ck["state_dict"]
    assert ema is not None and not torch.equal(ema["features.0.weight"], raw["features.0.weight"])
    assert checkpoint.eval_state(ck) is ema
    built = []
    real = inference.model_for_eval
    monkeypatch.setattr(inference, "model_for_eval", lambda *a: built.append(real(*a)) or built[-1])
    rc, out, _ = run_main(["--evaluate", run / "best.pth", "--data-dir", tiny_data, "--out-dir", tmp / "e",
                           "--cache-dir", tmp / "cache"])
    assert rc == 0 and f"{100 * ck['best_acc']:.2f}%" in out  # the best metric was measured on the EMA
    judged = built[0].state_dict()
    assert torch.equal(judged["features.0.weight"], ema["features.0.weight"])
    assert all(torch.equal(judged[k], v) for k, v in ema.items())


def test_class_weights_auto_and_listed():
    cfg = dict(recipes.DEFAULTS, class_weights="auto")
    w = loss.class_weights(cfg, "cpu", recall=[0.9, 0.9, 0.9, 0.9, 0.6])
    assert w[4] == w.max() and w[4] > 1 > w[0]
    assert loss.class_weights(cfg, "cpu", recall=None) is None  # before the first validation
    assert loss.class_weights(dict(cfg, class_weights="1,1,1,1,2"), "cpu").tolist() == [1, 1, 1, 1, 2]
    with pytest.raises(UserError):
        loss.class_weights(dict(cfg, class_weights="1,2"), "cpu")


def test_focal_loss():
    logits = torch.tensor([[4.0, 0, 0, 0, 0], [0.2, 0, 0, 0, 0]])
    y = torch.tensor([0, 0])
    ce = loss.make_loss(dict(recipes.DEFAULTS, label_smoothing=0.0))
    f0 = loss.make_loss(dict(recipes.DEFAULTS, focal_gamma=1e-9, label_smoothing=0.0))
    f2 = loss.make_loss(dict(recipes.DEFAULTS, focal_gamma=2.0, label_smoothing=0.0))
    assert torch.allclose(f0(logits, y), ce(logits, y), atol=1e-6)
    per = [f2(logits[i:i + 1], y[i:i + 1]) / ce(logits[i:i + 1], y[i:i + 1]) for i in range(2)]
    assert per[0] < per[1] < 1  # easy examples are down-weighted most
    soft = F.one_hot(y, 5).float()
    assert torch.allclose(f2(logits, soft), f2(logits, y))


def test_mixup_cutmix_give_soft_targets_and_train(tiny_data, tmp_path, run_main, monkeypatch):
    mix = loss.make_mix(dict(recipes.DEFAULTS, mixup=0.2, cutmix=1.0))
    x, y = torch.randn(8, 3, 100, 100), torch.arange(8) % 5
    xm, ym = mix(x, y)
    assert xm.shape == x.shape and ym.shape == (8, 5) and torch.allclose(ym.sum(1), torch.ones(8))
    assert loss.make_mix(recipes.DEFAULTS) is None
    seen = []
    real = loss.make_loss

    def make_loss(cfg, weights=None):  # records the targets the run's loss gets, and its class weights
        loss = real(cfg, weights)
        return lambda out, target: seen.append((target.dim(), weights is not None)) or loss(out, target)
    monkeypatch.setattr(loss, "make_loss", make_loss)
    rc, _, err = run_main(base_args(tiny_data, tmp_path, "--mixup", "0.2", "--cutmix", "1.0", "--epochs", "2",
                                    "--focal-gamma", "2", "--class-weights", "auto", "--amp", "bf16",
                                    "--channels-last"))
    assert rc == 0, err
    assert [dim for dim, _ in seen] == [2] * 4  # soft targets, every step of the 2 epochs
    assert [w for _, w in seen] == [False, False, True, True]  # weighted after the first validation


def test_soft_vote_of_checkpoints(ema_run, tiny_data, run_main):
    """A vote is the mean of its members' probabilities: of a model with itself, that model's; of two models,
    halfway between theirs (the second model: the first with its classifier's bias changed)."""
    tmp, run = ema_run
    flags = ["--data-dir", tiny_data, "--out-dir", tmp / "v", "--cache-dir", tmp / "cache", "--quiet"]
    rc, _, err = run_main(["--evaluate", run / "best.pth", *flags])
    assert rc == 0, err
    single = json.load(open(next((tmp / "v").glob("evaluate-three-*")) / "report.json"))
    rc, out, _ = run_main(["--evaluate", "vote", "--ensemble-of", run / "best.pth", run / "best.pth", *flags])
    vote = json.load(open(next((tmp / "v").glob("evaluate-vote-*")) / "report.json"))
    assert rc == 0 and vote["confusion_matrix"] == single["confusion_matrix"] and len(vote["checkpoints"]) == 2
    other = tmp / "other.pth"
    ck = torch.load(run / "best.pth", weights_only=True)
    bias = [k for k in ck["ema_state_dict"] if k.endswith("bias")][-1]  # the classifier's
    ck["ema_state_dict"][bias] = ck["ema_state_dict"][bias] + torch.arange(5.0)
    checkpoint.save(ck, str(other))
    cfg = {**recipes.DEFAULTS, "data_dir": tiny_data, "cache_dir": str(tmp / "cache"), "quiet": True}
    va = dataloader.loaders_for(cfg, torch.device("cpu"), ["validation"], sharded=False)["validation"]
    probs = {name: inference.vote_probs(cfg, paths, va, torch.device("cpu"), None)[0]
             for name, paths in (("a", [run / "best.pth"]), ("b", [other]), ("aa", [run / "best.pth"] * 2),
                                 ("ab", [run / "best.pth", other]))}
    assert torch.allclose(probs["aa"], probs["a"]) and torch.allclose(probs["aa"].sum(1), torch.ones(len(va.ids)))
    assert not torch.allclose(probs["a"], probs["b"], atol=1e-3)
    assert torch.allclose(probs["ab"], (probs["a"] + probs["b"]) / 2)
    rc, out, _ = run_main(["--predict", "vote", "--ensemble-of", run / "best.pth", run / "last.pth", *flags])
    assert rc == 0 and (next((tmp / "v").glob("predict-vote-*")) / "submission.csv").is_file()
    rc, _, err = run_main(["--evaluate", "vote", *flags])
    assert rc == 2 and "--ensemble-of" in err


def test_presets_keep_the_report_recipe_and_add_fast(tiny_data, tmp_path, run_main):
    report_cfg, _ = recipes.resolve_config(main.parse_args(["--model", "three", "--preset", "report"]))
    plain_cfg, _ = recipes.resolve_config(main.parse_args(["--model", "three"]))
    assert report_cfg == plain_cfg and report_cfg["scheduler"] == "plateau" and report_cfg["ema"] == 0
    assert report_cfg["rotate"] == 15 and report_cfg["shift"] == 0 and not report_cfg["tta"]  # the report's own
    fast, _ = recipes.resolve_config(main.parse_args(["--model", "three", "--preset", "fast"]))
    assert {k: fast[k] for k in ("batch_size", "lr", "early_stop", "plateau_patience")} == \
        dict(batch_size=256, lr=2e-3, early_stop=45, plateau_patience=45)
    assert {k: v for k, v in fast.items() if v != report_cfg[k]}.keys() == {"preset", "batch_size", "lr", "early_stop",
                                                                              "plateau_patience"}
    for model in ("skip", "ensemble"):  # no run has shown they keep their accuracy at a larger batch
        rc, out, err = run_main(base_args(tiny_data, tmp_path, "--model", model, "--preset", "fast"))
        assert rc == 2 and err.count("\n") == 1 and "--preset report" in err and not (tmp_path / "runs").exists()
    rc, out, err = run_main(base_args(tiny_data, tmp_path / "fast", "--preset", "fast", "--batch-size", "8",
                                      "--epochs", "1", "--device", "cpu"))
    assert rc == 0 and "--preset fast pays on a GPU" in out, err  # batch 256 was slower per image on the CPU
