"""Tests of icl.losses."""
import math

import pytest
import torch
import torch.nn.functional as F

from icl.losses import (
    LossWeights,
    consistency_rampup,
    dice_loss,
    icl_losses,
    soft_dice_loss,
    softmax_mse,
)
from icl.models import ICLOutputs


def _published_dice(inputs, target, K):
    """Transcription of the published DiceLoss (softmax=False): per-class loop."""
    loss = 0.0
    for i in range(K):
        t = (target == i).float()
        s = inputs[:, i]
        loss += 1 - (2 * (s * t).sum() + 1e-5) / ((s * s).sum() + (t * t).sum() + 1e-5)
    return loss / K


def test_dice_loss_hand_values():
    # one image, 2 classes, 2 pixels: p = [[1, 0], [0, 1]] (class-major), t = pixel classes [0, 0]
    probs = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    onehot = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # class 0: 1 - (2*1 + s)/(1 + 2 + s); class 1: 1 - s/(1 + 0 + s)
    s = 1e-5
    expect = ((1 - (2 + s) / (3 + s)) + (1 - s / (1 + s))) / 2
    assert math.isclose(float(dice_loss(probs, onehot)), expect, rel_tol=1e-6)
    assert float(dice_loss(onehot, onehot)) < 1e-5  # perfect prediction


def test_dice_loss_matches_published_loop():
    torch.manual_seed(0)
    probs = torch.randn(2, 3, 5, 6).softmax(1)
    labels = torch.randint(0, 3, (2, 5, 6))
    onehot = F.one_hot(labels, 3).movedim(-1, 1).float()
    torch.testing.assert_close(dice_loss(probs, onehot), _published_dice(probs, labels, 3))


def test_soft_dice_and_softmax_mse_hand_values():
    p = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    s = 1e-5
    expect = 1 - (2 * 0.5 + s) / (1 + 1 + s)  # same for both classes
    assert math.isclose(float(soft_dice_loss(p, q)), expect, rel_tol=1e-6)
    assert float(soft_dice_loss(q, q)) < 1e-5
    a = torch.zeros(1, 2, 3)  # softmax 0.5 / 0.5
    b = torch.tensor([[[100.0] * 3, [-100.0] * 3]])  # softmax 1 / 0
    assert math.isclose(float(softmax_mse(a, b)), 0.25, rel_tol=1e-6)
    assert float(softmax_mse(b, b)) == 0.0


def test_softmax_mse_detaches_target():
    a = torch.randn(2, 3, 4, requires_grad=True)
    b = torch.randn(2, 3, 4, requires_grad=True)
    softmax_mse(a, b).backward()
    assert a.grad is not None and b.grad is None


def test_rampup_and_weights():
    assert consistency_rampup(0) == 1.0 and consistency_rampup(10_000) == 1.0  # published: none
    assert math.isclose(consistency_rampup(0, 100), math.exp(-5))
    assert math.isclose(consistency_rampup(50, 100), math.exp(-5 * 0.25))
    assert consistency_rampup(100, 100) == 1.0 and consistency_rampup(500, 100) == 1.0
    assert LossWeights.published(2) == LossWeights(1, 1, 1, 50)
    assert LossWeights.published(3) == LossWeights(1, 1, 1, 10)
    with pytest.raises(ValueError):
        LossWeights.published(1)


def _outputs(B=2, K=3, S=(8, 8), sizes=((2, 2), (4, 4)), grad=True):
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    return ICLOutputs(
        logits_lab=t(B, K, *S),
        logits_unlab=t(B, K, *S),
        maps_lab=[t(B, K, *s) for s in sizes],
        maps_unlab=[t(B, K, *s) for s in sizes],
        maps_unlab_sspa=[t(B, K, *s) for s in sizes],
    )


def test_icl_losses_composition_and_published_aux():
    out = _outputs()
    labels = torch.randint(0, 3, (2, 8, 8))
    w = LossWeights(0.5, 2.0, 3.0, 7.0)
    d = icl_losses(out, labels, 3, w, consistency_scale=0.25)
    assert set(d) == {"total", "supervised", "auxiliary", "pseudo", "consistency"}
    expect = 0.5 * d["supervised"] + 2.0 * d["auxiliary"] + 3.0 * d["pseudo"] + 7.0 * 0.25 * d["consistency"]
    torch.testing.assert_close(d["total"], expect)
    # published AuxLoss: bilinear to the label size, CE/L + Dice/L
    ce = dc = 0.0
    for m in out.maps_lab:
        up = F.interpolate(m, size=(8, 8), mode="bilinear")
        ce = ce + F.cross_entropy(up, labels)
        dc = dc + _published_dice(up.softmax(1), labels, 3)
    torch.testing.assert_close(d["auxiliary"], ce / 2 + dc / 2)
    sup = F.cross_entropy(out.logits_lab, labels) + _published_dice(out.logits_lab.softmax(1), labels, 3)
    torch.testing.assert_close(d["supervised"], sup)
    # labels with a channel axis are accepted
    torch.testing.assert_close(icl_losses(out, labels[:, None], 3, w, 0.25)["total"], d["total"])


def test_icl_losses_gradients_only_where_they_should():
    out = _outputs()
    labels = torch.randint(0, 3, (2, 8, 8))
    d = icl_losses(out, labels, 3)
    d["pseudo"].backward(retain_graph=True)
    assert out.logits_unlab.grad is None  # pseudo target detached
    assert all(m.grad is not None for m in out.maps_unlab)
    for m in out.maps_unlab:
        m.grad = None
    d["consistency"].backward()
    assert all(m.grad is None for m in out.maps_unlab_sspa)  # SSPA target detached
    assert all(m.grad is not None for m in out.maps_unlab)


def test_icl_losses_perfect_prediction():
    labels = torch.randint(0, 3, (2, 8, 8))
    big = 40.0 * F.one_hot(labels, 3).movedim(-1, 1).float()
    out = ICLOutputs(big, big, [big], [big], [big])
    d = icl_losses(out, labels, 3)
    for k in ("supervised", "auxiliary", "pseudo", "consistency"):
        assert float(d[k]) < 1e-4, (k, float(d[k]))


def test_icl_losses_3d():
    out = _outputs(B=1, K=2, S=(8, 8, 4), sizes=((2, 2, 1), (4, 4, 2)))
    d = icl_losses(out, torch.randint(0, 2, (1, 8, 8, 4)), 2, LossWeights.published(3))
    assert torch.isfinite(d["total"]) and d["total"].requires_grad
