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
  (the same soft Dice, averaged with the USCL levels as one more level).
The consistency weight is multiplied by the sigmoid ramp-up of
``consistency_rampup`` iterations (0: none, as published)."""
from __future__ import annotations

import dataclasses

from ..losses import LossWeights, icl_losses
from .base import Method, ramp
from .views import strong_intensity

VIEWS = ("one", "weak-strong", "weak-strong-all")


class ICLMethod(Method):
    name = "icl"
    default_weights = {"supervised": 1.0, "auxiliary": 1.0, "pseudo": 1.0, "consistency": 50.0}

    def __init__(self, cfg):
        super().__init__(cfg)
        w = LossWeights.published(len(cfg.patch_size))
        self.weights = {k: getattr(w, k) for k in self.default_weights}

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        if cfg.icl_views not in VIEWS:
            raise ValueError(f"--icl-views {cfg.icl_views!r}: expected one of {', '.join(VIEWS)}")

    def build_net(self, backend):
        from ..models import build_model

        cfg = self.cfg
        return build_model(cfg.arch, cfg.in_channels, cfg.num_classes, tuple(cfg.patch_size), mixer=cfg.mixer,
                           global_queries=cfg.global_queries, faithful=cfg.faithful, backend=backend,
                           max_mixer_params=cfg.max_mixer_params, **dict(cfg.model_options or {}))

    def backbone(self, net):
        return net.backbone

    def forward(self, net, x_lab, x_unlab, y_lab, iteration):
        strong = strong_intensity(x_unlab) if self.cfg.icl_views != "one" else None
        return net.forward_train(x_lab, x_unlab, y_lab, x_unlab_strong=strong)

    def losses(self, out, y_lab, iteration):
        self._scale = ramp(iteration, self.cfg.consistency_rampup)
        if self.cfg.icl_views != "weak-strong-all":  # the strong-view logits only feed weak-strong-all's pseudo term
            out = dataclasses.replace(out, logits_unlab_strong=None)
        return icl_losses(out, y_lab, self.num_classes, LossWeights(**self.weights), consistency_scale=self._scale)

    def log_scalars(self):
        return {"consistency_scale": getattr(self, "_scale", 1.0)}
