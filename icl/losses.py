"""The ICL training losses (published ``train_inherent_consistent_*.py`` and
``utils/losses.py`` of zhuye98/ICL).

total = w_sup * (CE + Dice)(labeled logits, labels)
      + w_aux * mean_l (CE + Dice)(up(SSPA map_l on labeled), labels)
      + w_pse * mean_l SoftDice(softmax(up(USCL map_l)), softmax(unlabeled logits).detach())
      + w_con * scale * mean_l MSE(softmax(USCL map_l), softmax(SSPA map_l on unlabeled).detach())

``up`` is bilinear/trilinear interpolation (align_corners=False) to the label size.
The published scripts use constant weights (2D: 1, 1, 1, 50; 3D BraTS: 1, 1, 1, 10)
and no consistency ramp-up (the AMOS script defines a sigmoid ramp-up it never
uses), so ``consistency_scale=1.0`` is the published schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .models.icl_net import ICLOutputs

__all__ = [
    "LossWeights",
    "consistency_rampup",
    "dice_loss",
    "icl_losses",
    "soft_dice_loss",
    "softmax_mse",
]

_SMOOTH = 1e-5


@dataclass
class LossWeights:
    """Weights of the four loss terms."""

    supervised: float = 1.0
    auxiliary: float = 1.0
    pseudo: float = 1.0
    consistency: float = 50.0

    @classmethod
    def published(cls, spatial_dims: int) -> "LossWeights":
        """2D (ACDC script): 1, 1, 1, 50; 3D (BraTS script): 1, 1, 1, 10.
        (The AMOS script uses pseudo 0.1, consistency 10.)"""
        if spatial_dims == 2:
            return cls(1.0, 1.0, 1.0, 50.0)
        if spatial_dims == 3:
            return cls(1.0, 1.0, 1.0, 10.0)
        raise ValueError(f"LossWeights.published: spatial_dims must be 2 or 3, got {spatial_dims!r}")


def consistency_rampup(iteration: float, rampup_length: float = 0.0) -> float:
    """Multiplier of the consistency weight at ``iteration``.

    ``rampup_length <= 0`` (default): 1.0 always, as in the published ICL scripts.
    Otherwise the usual sigmoid ramp-up exp(-5 (1 - t)^2), t = clip(iteration /
    rampup_length, 0, 1) (Laine & Aila 2017; what the AMOS script defines).
    """
    if rampup_length <= 0:
        return 1.0
    t = min(max(float(iteration) / float(rampup_length), 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def dice_loss(probs: Tensor, onehot: Tensor, smooth: float = _SMOOTH) -> Tensor:
    """Published ``DiceLoss``: mean over classes of 1 - (2 sum(p t) + s) / (sum(p^2) + sum(t^2) + s),
    sums over batch and space. probs, onehot: [B, K, *S]."""
    if probs.shape != onehot.shape:
        raise ValueError(f"dice_loss: probs {tuple(probs.shape)} and onehot {tuple(onehot.shape)} differ")
    onehot = onehot.to(probs.dtype)
    dims = [0] + list(range(2, probs.dim()))
    inter = (probs * onehot).sum(dims)
    denom = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def soft_dice_loss(probs: Tensor, target: Tensor, smooth: float = _SMOOTH) -> Tensor:
    """Published ``dice_loss1`` averaged over classes: 1 - (2 sum(p q) + s) / (sum(p) + sum(q) + s).
    probs, target: [B, K, *S] probabilities."""
    if probs.shape != target.shape:
        raise ValueError(f"soft_dice_loss: shapes {tuple(probs.shape)} and {tuple(target.shape)} differ")
    dims = [0] + list(range(2, probs.dim()))
    inter = (probs * target).sum(dims)
    denom = probs.sum(dims) + target.sum(dims)
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def softmax_mse(a_logits: Tensor, b_logits: Tensor) -> Tensor:
    """mean((softmax(a) - softmax(b).detach())^2), softmax over dim 1; b is the target."""
    if a_logits.shape != b_logits.shape:
        raise ValueError(f"softmax_mse: shapes {tuple(a_logits.shape)} and {tuple(b_logits.shape)} differ")
    return (F.softmax(a_logits, dim=1) - F.softmax(b_logits.detach(), dim=1)).pow(2).mean()


def _upsample(x: Tensor, size: Sequence[int]) -> Tensor:
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.dim() - 2]
    return F.interpolate(x.float(), size=size, mode=mode, align_corners=False)


def _labels(labels: Tensor, logits: Tensor) -> Tensor:
    if labels.dim() == logits.dim() and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape[0] != logits.shape[0] or labels.shape[1:] != logits.shape[2:]:
        raise ValueError(f"icl_losses: labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    return labels.long()


def _ce_dice(logits: Tensor, labels: Tensor, onehot: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels) + dice_loss(F.softmax(logits, dim=1), onehot)


def icl_losses(
    outputs: "ICLOutputs",
    labels_lab: Tensor,
    num_classes: int,
    weights: Optional[LossWeights] = None,
    consistency_scale: float = 1.0,
) -> Dict[str, Tensor]:
    """The four ICL losses and their weighted sum.

    labels_lab: [B_l, *S] (or [B_l, 1, *S]) integer labels. Returns a dict of
    scalar tensors ``total``, ``supervised``, ``auxiliary``, ``pseudo``,
    ``consistency``; the four terms are unweighted, ``total`` = sum of
    weight * term (``weights`` default: ``LossWeights()``, the 2D published values) with the consistency weight multiplied by ``consistency_scale``.
    The pseudo and consistency targets are detached.
    """
    if weights is None:
        weights = LossWeights()
    logits_lab = outputs.logits_lab
    labels = _labels(labels_lab, logits_lab)
    onehot = F.one_hot(labels, num_classes).movedim(-1, 1).float()
    size = labels.shape[1:]

    supervised = _ce_dice(logits_lab, labels, onehot)

    L = len(outputs.maps_lab)
    auxiliary = sum(_ce_dice(_upsample(m, size), labels, onehot) for m in outputs.maps_lab) / L

    target = F.softmax(outputs.logits_unlab.detach().float(), dim=1)
    usize = outputs.logits_unlab.shape[2:]
    pseudo_maps = [F.softmax(_upsample(m, usize), dim=1) for m in outputs.maps_unlab]
    strong = getattr(outputs, "logits_unlab_strong", None)
    if strong is not None:  # weak-to-strong training: the backbone's strong-view prediction is one more level
        pseudo_maps.append(F.softmax(strong.float(), dim=1))
    pseudo = sum(soft_dice_loss(p, target) for p in pseudo_maps) / len(pseudo_maps)

    if len(outputs.maps_unlab) != len(outputs.maps_unlab_sspa):
        raise ValueError("icl_losses: maps_unlab and maps_unlab_sspa have different numbers of levels")
    consistency = sum(
        softmax_mse(a, b) for a, b in zip(outputs.maps_unlab, outputs.maps_unlab_sspa)
    ) / len(outputs.maps_unlab)

    total = (
        weights.supervised * supervised
        + weights.auxiliary * auxiliary
        + weights.pseudo * pseudo
        + weights.consistency * float(consistency_scale) * consistency
    )
    return {
        "total": total,
        "supervised": supervised,
        "auxiliary": auxiliary,
        "pseudo": pseudo,
        "consistency": consistency,
    }
