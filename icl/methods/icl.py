"""Inherent Consistent Learning (Zhu et al., MIDL 2023): SSPA and USCL heads on
the backbone's decoder maps, the four published loss terms
(:func:`icl.losses.icl_losses`).

``icl_views`` chooses what the unlabeled stream sees:
- ``"one"`` (published): one view; the pseudo and consistency targets are the
  backbone's prediction and SSPA's maps on the same features USCL reads;
- ``"weak-strong"``: the targets come from the weak view (the data pipeline's
  augmentation) without gradients, USCL reads the strong view
  (:func:`~icl.methods.views.strong_intensity`), so the unlabeled losses ask
  for invariance to the perturbation;
- ``"weak-strong-all"``: as ``"weak-strong"``, and the pseudo term also pulls
  the backbone's own prediction on the strong view towards the weak view's
  (the same soft Dice, averaged with the USCL levels as one more level);
- ``"weak-strong-confident"``: as ``"weak-strong"`` on the FixMatch strong view
  (:func:`~icl.methods.views.strong_view`, with cutout), plus a ``confident``
  term: cross-entropy of the backbone's strong-view prediction against the weak
  view's hard labels where their softmax confidence reaches
  ``confidence_threshold`` (default 0.95, FixMatch's; pixels under a cutout box
  ignored), i.e. the FixMatch loss added to ICL's four terms. Not in the paper;
- ``"one-confident"``: the published one-view stream unchanged, plus the same
  ``confident`` term on a separate strong view (one more backbone pass).
The consistency weight is multiplied by the sigmoid ramp-up of
``consistency_rampup`` iterations (0: none, as published).

``icl_passes`` chooses how the backbone sees a batch: ``"split"`` (published)
runs it on the labeled and the unlabeled images separately, so BatchNorm
normalises each part with its own statistics and its running statistics (what
evaluation uses) average two kinds of batches; ``"joint"`` runs it once on
both (the unlabeled images that get gradients: the strong view in the
weak-strong modes), as the supervised and FixMatch runs do. Not in the paper."""
from __future__ import annotations

import dataclasses


from ..losses import LossWeights, icl_losses
from .base import Method, confident_pseudo_labels, logits_of, masked_ce, ramp
from .views import strong_intensity, strong_view

VIEWS = ("one", "weak-strong", "weak-strong-all", "weak-strong-confident", "one-confident")
PASSES = ("split", "joint")
CONFIDENT = ("weak-strong-confident", "one-confident")


class ICLMethod(Method):
    name = "icl"
    uses_kernels = True
    default_weights = {"supervised": 1.0, "auxiliary": 1.0, "pseudo": 1.0, "consistency": 50.0, "confident": 1.0}

    def __init__(self, cfg):
        super().__init__(cfg)
        w = LossWeights.published(len(cfg.patch_size))
        self.weights = {k: getattr(w, k) for k in self.default_weights if k != "confident"}
        self.weights["confident"] = self.default_weights["confident"]

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        if "confident" in (cfg.loss_weights or {}) and cfg.icl_views not in CONFIDENT:
            raise ValueError(f"loss_weights: the 'confident' term needs --icl-views {' or '.join(CONFIDENT)}, "
                             f"got --icl-views {cfg.icl_views}")

    def build_net(self, backend):
        from ..models import build_model

        cfg = self.cfg
        return build_model(cfg.arch, cfg.in_channels, cfg.num_classes, tuple(cfg.patch_size), mixer=cfg.mixer,
                           global_queries=cfg.global_queries, faithful=cfg.faithful, backend=backend,
                           max_mixer_params=cfg.max_mixer_params, **dict(cfg.model_options or {}))

    def backbone(self, net):
        return net.backbone

    def forward(self, net, x_lab, x_unlab, y_lab, iteration):
        views = self.cfg.icl_views
        keep = None
        if views in ("one", "one-confident"):
            strong = None
        elif views == "weak-strong-confident":
            strong, keep = strong_view(x_unlab)
        else:
            strong = strong_intensity(x_unlab)
        out = net.forward_train(x_lab, x_unlab, y_lab, x_unlab_strong=strong, joint=self.cfg.icl_passes == "joint")
        if views == "one-confident":
            image, keep = strong_view(x_unlab)
            out = dataclasses.replace(out, logits_unlab_strong=logits_of(net.backbone, image))
        return out, keep

    def losses(self, out, y_lab, iteration):
        out, keep = out
        self._scale = ramp(iteration, self.cfg.consistency_rampup)
        strong = out.logits_unlab_strong
        if self.cfg.icl_views != "weak-strong-all":  # the strong-view logits only feed weak-strong-all's pseudo term
            out = dataclasses.replace(out, logits_unlab_strong=None)
        four = {k: v for k, v in self.weights.items() if k != "confident"}
        terms = icl_losses(out, y_lab, self.num_classes, LossWeights(**four), consistency_scale=self._scale)
        if self.cfg.icl_views in CONFIDENT:
            hard, confident_px = confident_pseudo_labels(out.logits_unlab.detach(), self.cfg.confidence_threshold)
            mask = confident_px & keep
            confident = masked_ce(strong, hard, mask)
            self._mask = mask.float().mean().detach()  # read in log_scalars: no host sync (graph break) in the step
            terms["confident"] = confident
            terms["total"] = terms["total"] + self.weights["confident"] * confident
        return terms

    def log_scalars(self):
        out = {"consistency_scale": getattr(self, "_scale", 1.0)}
        if self.cfg.icl_views in CONFIDENT:
            out["mask_ratio"] = float(getattr(self, "_mask", 0.0))
        return out
