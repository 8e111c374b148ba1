"""The models against the report's layer tables: parameter counts, shapes, the ensemble's frozen bases."""
import torch

import models


def test_parameter_counts_match_the_report():
    assert models.count_params(models.ThreeCNN()) == 691_781
    assert models.count_params(models.SkipConCNN()) == 8_695_045
    ens = models.EnsembleCNN()
    assert models.count_params(ens) == 9_387_553
    assert models.count_params(ens, trainable_only=True) == 727


def test_output_shapes():
    x = torch.randn(2, 3, 100, 100)
    for name in ["three", "skip", "ensemble"]:
        m = models.build_model(name).eval()
        assert m(x).shape == (2, 5), name


def test_rescnn_full_res_width_widens_its_full_resolution_stage_only():
    x = torch.randn(2, 3, 100, 100)
    assert models.count_params(models.build_model("res")) == 1_958_821
    wide = models.build_model("res", 48).eval()
    # 32 -> 48 channels: the stem (+16 x 27 weights, +2 x 16 BN), the block (2 x (48^2 - 32^2) x 9, +4 x 16 BN) and
    # the 48 -> 64 conv of the next stage (+16 x 64 x 9)
    assert models.count_params(wide) == 1_958_821 + 464 + 23_104 + 9_216
    assert wide.features[:4](x).shape == (2, 48, 100, 100)  # stem conv, BN, ReLU, block
    assert wide.features[:8](x).shape == (2, 64, 50, 50)  # the later stages as before
    assert wide(x).shape == (2, 5)


def test_intermediate_shapes_follow_the_tables():
    x = torch.randn(1, 3, 100, 100)
    feats = models.ThreeCNN().eval().features
    assert feats[:-2](x).shape == (1, 192, 11, 11)  # after the third max-pool
    assert feats(x).shape == (1, 192, 4, 4)
    skip = models.SkipConCNN().eval().features
    assert skip[:7](x).shape == (1, 256, 50, 50)
    assert skip[:9](x).shape == (1, 512, 25, 25)
    assert skip(x).shape == (1, 512, 6, 6)


def test_ensemble_output_is_a_log_probability():
    m = models.EnsembleCNN().eval()
    out = m(torch.randn(3, 3, 100, 100))
    assert torch.allclose(out.exp().sum(1), torch.ones(3), atol=1e-5)


def test_ensemble_bases_stay_frozen_through_a_training_step():
    torch.manual_seed(0)
    m = models.EnsembleCNN()
    m.train()
    assert not m.skip.training and not m.three.training
    before = {k: v.clone() for k, v in m.state_dict().items() if k.startswith(("skip.", "three."))}
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.1)
    head_before = m.meta[0].weight.clone()
    loss = torch.nn.functional.nll_loss(m(torch.randn(4, 3, 100, 100)), torch.tensor([0, 1, 2, 4]))
    loss.backward()
    opt.step()
    after = m.state_dict()
    for k, v in before.items():  # weights and BatchNorm running statistics alike
        assert torch.equal(v, after[k]), k
    assert all(p.grad is None for p in m.bases_parameters())
    assert not torch.equal(head_before, m.meta[0].weight)
