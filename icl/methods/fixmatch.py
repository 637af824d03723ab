"""FixMatch-style weak-to-strong pseudo-labelling (Sohn et al. 2020; as used for
segmentation by UniMatch, Yang et al. 2023, without its feature-perturbation
stream): hard pseudo-labels from the weak view (the data pipeline's own
augmentation) where the softmax confidence reaches ``confidence_threshold``
(default 0.95), cross-entropy of the prediction on the strong view
(:func:`~icl.methods.views.strong_view`: random intensity curve,
gamma/contrast/noise, cutout) against them. Pixels under a cutout box or below
the threshold count as zero in the mean."""
from __future__ import annotations

import torch

from .base import Method, confident_pseudo_labels, logits_of, masked_ce, supervised_loss
from .views import strong_view


class FixMatch(Method):
    name = "fixmatch"
    default_weights = {"supervised": 1.0, "pseudo": 1.0}

    def forward(self, net, x_lab, x_unlab, y_lab, iteration):
        L = x_lab.shape[0]
        with torch.no_grad():
            weak = logits_of(net, x_unlab)
        strong, keep = strong_view(x_unlab)
        logits = logits_of(net, torch.cat([x_lab, strong]))
        return logits[:L], logits[L:], weak, keep

    def losses(self, out, y_lab, iteration):
        logits_lab, logits_strong, weak, keep = out
        sup = supervised_loss(logits_lab, y_lab, self.num_classes)
        pseudo, confident = confident_pseudo_labels(weak, self.cfg.confidence_threshold)
        mask = confident & keep
        unsup = masked_ce(logits_strong, pseudo, mask)
        self._mask = mask.float().mean().detach()  # read in log_scalars: no host sync (graph break) in the step
        total = self.weights["supervised"] * sup + self.weights["pseudo"] * unsup
        return {"total": total, "supervised": sup, "pseudo": unsup}

    def log_scalars(self):
        return {"mask_ratio": float(getattr(self, "_mask", 0.0))}
