"""Supervised only: the labeled part of each batch, CE + Dice."""
from __future__ import annotations

from .base import Method, logits_of, supervised_loss


class Supervised(Method):
    name = "supervised"
    uses_unlabeled = False
    default_weights = {"supervised": 1.0}

    def forward(self, net, x_lab, x_unlab, y_lab, iteration):
        return logits_of(net, x_lab)

    def losses(self, logits, y_lab, iteration):
        sup = supervised_loss(logits, y_lab, self.num_classes)
        return {"total": self.weights["supervised"] * sup, "supervised": sup}
