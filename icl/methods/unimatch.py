"""UniMatch-style weak-to-strong pseudo-labelling (Yang et al., CVPR 2023):
FixMatch (:mod:`icl.methods.fixmatch`) widened in two ways.

- **Two strong views** of each unlabeled image (independent draws of
  :func:`~icl.methods.views.strong_view`), each trained against the same hard
  pseudo-labels of the weak view.
- **A feature-perturbation stream**: the weak view's encoder features, each
  level through channel dropout (``Dropout2d(0.5)``), decoded and trained
  against the pseudo-labels, so the decoder must agree with itself when half of
  the features are missing.

Pseudo-labels are the weak view's argmax where its softmax confidence reaches
``confidence_threshold`` (default 0.95), computed without gradients (as in
FixMatch here). Unlabeled loss = 0.25 CE(strong 1) + 0.25 CE(strong 2) +
0.5 CE(feature-perturbed), UniMatch's split, with the same per-pixel mean
(masked pixels and cutout boxes count as zero) as FixMatch, and weight 1 next
to the supervised CE + Dice, as FixMatch. Not taken over: UniMatch's CutMix
between strong views and its Dice loss on unlabeled pixels of the medical
version; the strong views are this library's (random intensity curve,
gamma/contrast/noise, cutout).

Needs a backbone with ``encoder`` (image -> list of feature maps) and
``decoder`` (that list -> logits first): the 2D UNet.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method, confident_pseudo_labels, logits_of, masked_ce, supervised_loss
from .views import strong_view

FEATURE_DROPOUT = 0.5


def perturbed_logits(net, x, p: float = FEATURE_DROPOUT):
    """Logits of ``net``'s decoder on its encoder features of ``x`` after
    channel dropout with probability ``p`` at every level (always on, also
    when ``net`` is in eval mode: it is the perturbation, not regularisation)."""
    feats = net.encoder(x)
    out = net.decoder([F.dropout2d(f, p, training=True) for f in feats])
    return out[0] if isinstance(out, (tuple, list)) else out


class UniMatch(Method):
    name = "unimatch"
    default_weights = {"supervised": 1.0, "pseudo": 1.0}
    # UniMatch's split of the unlabeled term between its three streams
    STREAM_SHARES = {"strong1": 0.25, "strong2": 0.25, "feature": 0.5}

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.arch != "unet2d":
            raise ValueError(f"--method unimatch needs a backbone with an encoder/decoder split (the 2D UNet), "
                             f"got --model {cfg.model} ({cfg.arch})")

    def forward(self, net, x_lab, x_unlab, y_lab, iteration):
        L, U = x_lab.shape[0], x_unlab.shape[0]
        with torch.no_grad():
            weak = logits_of(net, x_unlab)
        s1, keep1 = strong_view(x_unlab)
        s2, keep2 = strong_view(x_unlab)
        logits = logits_of(net, torch.cat([x_lab, s1, s2]))
        fp = perturbed_logits(net, x_unlab)
        return logits[:L], logits[L:L + U], logits[L + U:], fp, weak, keep1, keep2

    def losses(self, out, y_lab, iteration):
        logits_lab, logits_s1, logits_s2, logits_fp, weak, keep1, keep2 = out
        sup = supervised_loss(logits_lab, y_lab, self.num_classes)
        pseudo, confident = confident_pseudo_labels(weak, self.cfg.confidence_threshold)
        parts = {"strong1": masked_ce(logits_s1, pseudo, confident & keep1),
                 "strong2": masked_ce(logits_s2, pseudo, confident & keep2),
                 "feature": masked_ce(logits_fp, pseudo, confident)}
        unsup = sum(self.STREAM_SHARES[k] * v for k, v in parts.items())
        self._mask = confident.float().mean().detach()  # read in log_scalars: no host sync (graph break) in the step
        total = self.weights["supervised"] * sup + self.weights["pseudo"] * unsup
        return {"total": total, "supervised": sup, "pseudo": unsup}

    def log_scalars(self):
        return {"mask_ratio": float(getattr(self, "_mask", 0.0))}
