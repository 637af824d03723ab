"""Mean Teacher (Tarvainen & Valpola 2017) in the SSL4MIS formulation: the
student sees [labeled, unlabeled + noise], an EMA teacher sees the unlabeled
images with its own noise, consistency = mean squared difference of the two
softmaxes, weighted by w * exp(-5 (1 - t)^2) ramped over ``consistency_rampup``
iterations (default: the whole schedule, as SSL4MIS ramps over its 30k).
The student is what is evaluated and exported."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .base import Method, logits_of, ramp, supervised_loss
from .views import gaussian_noise


class MeanTeacher(Method):
    name = "mean-teacher"
    default_weights = {"supervised": 1.0, "consistency": 0.1}
    ema_decay = 0.99

    def build_net(self, backend):
        net = super().build_net(backend)
        self.teacher = copy.deepcopy(net)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.train()  # as SSL4MIS: dropout on, batch statistics
        return net

    def to(self, device):
        self.teacher.to(device)

    def forward(self, net, x_lab, x_unlab, y_lab, iteration):
        L = x_lab.shape[0]
        logits = logits_of(net, torch.cat([x_lab, gaussian_noise(x_unlab)]))
        with torch.no_grad():
            teacher = logits_of(self.teacher, gaussian_noise(x_unlab))
        return logits[:L], logits[L:], teacher

    def losses(self, out, y_lab, iteration):
        logits_lab, logits_unlab, teacher = out
        sup = supervised_loss(logits_lab, y_lab, self.num_classes)
        cons = (F.softmax(logits_unlab.float(), 1) - F.softmax(teacher.float(), 1)).pow(2).mean()
        length = self.cfg.consistency_rampup if self.cfg.consistency_rampup > 0 else self.cfg.max_iterations
        self._scale = ramp(iteration, length)
        total = self.weights["supervised"] * sup + self.weights["consistency"] * self._scale * cons
        return {"total": total, "supervised": sup, "consistency": cons}

    @torch.no_grad()
    def after_step(self, net, iteration):
        alpha = min(1.0 - 1.0 / (iteration + 1), self.ema_decay)
        for t, s in zip(self.teacher.parameters(), net.parameters()):
            t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)

    def log_scalars(self):
        return {"consistency_scale": getattr(self, "_scale", 0.0)}

    def state_dict(self):
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state):
        if "teacher" not in (state or {}):
            raise ValueError("--method mean-teacher: the checkpoint has no EMA teacher (method_state.teacher)")
        self.teacher.load_state_dict(state["teacher"], strict=True)
