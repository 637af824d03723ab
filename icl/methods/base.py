"""The contract between the trainer and a method."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def supervised_loss(logits: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """CE + Dice (the published supervised term)."""
    from ..losses import dice_loss

    logits = logits.float()
    onehot = F.one_hot(labels.long(), num_classes).movedim(-1, 1).float()
    return F.cross_entropy(logits, labels.long()) + dice_loss(torch.softmax(logits, dim=1), onehot)


def confident_pseudo_labels(weak_logits: Tensor, threshold: float):
    """(hard labels, confident mask) of a weak view: the softmax argmax, and where its
    probability reaches ``threshold`` (FixMatch's rule, used by every method here)."""
    conf, hard = F.softmax(weak_logits.float(), 1).max(1)
    return hard, conf >= threshold


def masked_ce(logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-pixel cross-entropy against ``target``; pixels outside ``mask`` count as
    zero in the mean over all pixels (FixMatch's normalisation)."""
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (ce * mask).sum() / mask.numel()


class Method:
    """One semi-supervised (or supervised) training method.

    The trainer calls, in order: ``build_net`` once (the module the optimiser
    trains and the checkpoint's ``model``), ``backbone(net)`` (what is
    evaluated and exported), then per iteration ``forward`` (inside the
    DDP-wrapped step module, so everything that needs gradients runs there),
    ``losses`` and, after the optimiser step, ``after_step``. ``state_dict`` /
    ``load_state_dict`` carry extra state (an EMA teacher) through checkpoints.

    ``default_weights`` lists the loss weights a user may override with
    ``loss_weights`` in the config (other keys are refused).
    """

    name = ""
    uses_unlabeled = True
    uses_kernels = False  # its network runs icl_kernels ops (then --backend must take --amp's tokens)
    default_weights: Dict[str, float] = {}

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.num_classes = int(cfg.num_classes)
        self.weights = dict(self.default_weights)

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise ValueError naming the option when ``cfg`` does not suit the method."""
        if cfg.loss_weights:
            bad = sorted(set(cfg.loss_weights) - set(cls.default_weights))
            if bad:
                raise ValueError(f"loss_weights: unknown term(s) {bad} for --method {cls.name}; "
                                 f"expected some of {sorted(cls.default_weights)}")
            negative = {k: v for k, v in cfg.loss_weights.items() if not float(v) >= 0}
            if negative:
                raise ValueError(f"loss_weights: weights must be numbers >= 0, got {negative}")
        if cls.uses_unlabeled and cfg.labeled_bs >= cfg.batch_size:
            raise ValueError(f"--labeled-bs {cfg.labeled_bs} leaves no unlabeled slot in --batch-size "
                             f"{cfg.batch_size} (--method {cls.name} trains on unlabeled images too)")

    def set_weights(self, overrides: Optional[Dict[str, float]]) -> None:
        if overrides:
            self.weights.update({k: float(v) for k, v in overrides.items()})

    # -- model -------------------------------------------------------------
    def build_net(self, backend: Optional[str]) -> nn.Module:
        from ..models import build_backbone

        cfg = self.cfg
        return build_backbone(cfg.arch, cfg.in_channels, cfg.num_classes, tuple(cfg.patch_size),
                              **dict(cfg.model_options or {}))

    def backbone(self, net: nn.Module) -> nn.Module:
        return net

    def to(self, device) -> None:
        """Move method-owned modules (a teacher) to ``device``."""

    # -- one step ----------------------------------------------------------
    def forward(self, net: nn.Module, x_lab: Tensor, x_unlab: Optional[Tensor], y_lab: Tensor, iteration: int):
        raise NotImplementedError

    def losses(self, out, y_lab: Tensor, iteration: int) -> Dict[str, Tensor]:
        raise NotImplementedError

    def after_step(self, net: nn.Module, iteration: int) -> None:
        """Called after each optimiser step with the number of steps done."""

    def log_scalars(self) -> Dict[str, float]:
        """Extra numbers for log.csv (e.g. the share of pixels that pass a threshold)."""
        return {}

    # -- checkpoint ----------------------------------------------------------
    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict) -> None:
        if state:
            raise ValueError(f"--method {self.name}: unexpected method state in the checkpoint ({sorted(state)})")


def logits_of(net: nn.Module, x: Tensor) -> Tensor:
    """A bare backbone's logits (the UNets also return their decoder maps in training mode)."""
    out = net(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def ramp(iteration: int, length: float) -> float:
    """The sigmoid ramp-up exp(-5 (1 - t)^2), t = clip(iteration / length, 0, 1); 1 when length <= 0."""
    if length <= 0:
        return 1.0
    return _ramp_host(iteration, length)


@torch.compiler.disable
def _ramp_host(iteration: int, length: float) -> float:
    """Under ``torch.compile`` (``--compile``) this Python arithmetic on the iteration runs eagerly (one
    graph break): traced, ``math.exp`` would bake each iteration's value into the graph and recompile it
    every iteration until Dynamo's recompile limit sends the step back to eager."""
    from ..losses import consistency_rampup

    return consistency_rampup(iteration, length)
