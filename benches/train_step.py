"""Benchmark of one ICL training iteration (forward of both batches, the two
heads, the losses, backward and the optimiser step), with a breakdown.

Run from a checkout:  python -m benches.train_step [--quick] [--csv FILE] [--device cuda]

Providers:
  published-formulation  the published model: faithful heads (two LayerNorms,
                         drop-path doubling, published head split), the spatial
                         MLP mixer, and the attention computed explicitly as the
                         published module does (every token projected)
  icl-fused-mlp          icl's model with the fused attention and the published spatial MLP
  icl-fused-conv         icl's model with the fused attention and the light conv mixer (default)
Breakdown rows (shape suffix `part=...`): backbone, attention, spatial_mixing,
losses, optimizer; each timed alone (forward+backward) on inputs captured from
a real step, so the parts need not add up exactly to the step.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from icl.losses import LossWeights, icl_losses
from icl.models import build_model
from icl.models.head import ClassDecoder

from . import common

OP = "train_step"


def configs(device: torch.device, quick: bool) -> List[Tuple[str, str, Tuple[int, ...], int, int, int, bool]]:
    """(label, arch, patch, labeled_bs, unlabeled_bs, classes, reduced)."""
    if quick:
        return [("cfg=quick2d", "unet2d", (32, 32), 1, 1, 3, True)]
    full = [
        ("cfg=acdc2d", "unet2d", (256, 256), 8, 8, 4, False),
        ("cfg=brats3d", "unet3d", (96, 96, 96), 2, 2, 2, False),
    ]
    reduced = [
        ("cfg=acdc2d-reduced", "unet2d", (128, 128), 4, 4, 4, True),
        ("cfg=brats3d-reduced", "unet3d", (48, 48, 48), 1, 1, 2, True),
    ]
    return full + reduced


def mlp_params(arch: str, patch: Tuple[int, ...]) -> int:
    """Parameters of the published spatial MLP mixers in the two heads."""
    fracs = (8, 4, 2) if arch == "unet2d" else (16, 8, 4)
    total = 0
    for f in fracs:
        n = 1
        for p in patch:
            n *= p // f
        total += 2 * n * n + 2 * n + 2 * n  # Linear(N,N) x2 + biases + LayerNorm(N)
    return 2 * total


def make_model(provider: str, arch: str, patch, classes: int, device):
    mixer = "conv" if provider == "icl-fused-conv" else "mlp"
    faithful = provider == "published-formulation"
    model = build_model(arch, 1, classes, patch, mixer=mixer, global_queries="batch", faithful=faithful,
                        max_mixer_params=None)
    if provider == "published-formulation":
        for m in model.modules():
            if isinstance(m, ClassDecoder):
                m.attn.forward = m.attn.forward_explicit  # project every token, as published
    return model.to(device).train()


class Step:
    def __init__(self, provider, arch, patch, lb, ub, classes, device, dtype):
        self.model = make_model(provider, arch, patch, classes, device)
        g = torch.Generator().manual_seed(0)
        self.x_lab = torch.randn(lb, 1, *patch, generator=g).to(device)
        self.x_unlab = torch.randn(ub, 1, *patch, generator=g).to(device)
        self.y_lab = torch.randint(0, classes, (lb, *patch), generator=g).to(device)
        self.classes = classes
        self.weights = LossWeights.published(len(patch))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.device, self.dtype = device, dtype

    def _autocast(self):
        if self.dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.dtype)

    def losses(self):
        with self._autocast():
            out = self.model.forward_train(self.x_lab, self.x_unlab, self.y_lab)
        return out, icl_losses(out, self.y_lab, self.classes, self.weights)

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        _, losses = self.losses()
        losses["total"].backward()
        self.opt.step()

    # -- breakdown -----------------------------------------------------------------
    def capture(self):
        """Inputs of every attention and mixer call, and the outputs, from one step."""
        calls = {"attention": [], "spatial_mixing": []}
        hooks = []
        for m in self.model.modules():
            if isinstance(m, ClassDecoder):
                hooks.append(m.attn.register_forward_pre_hook(
                    lambda mod, args, m=m: calls["attention"].append((mod, [a.detach() for a in args]))))
                mixer = m.mlp2 if m.mixer_kind == "mlp" else m.mixer
                pre = m.norm3 if m.mixer_kind == "mlp" else None

                def hook(mod, args, pre=pre, mixer=mixer):
                    calls["spatial_mixing"].append(((pre, mixer), [a.detach() for a in args]))

                hooks.append((pre or mixer).register_forward_pre_hook(hook))
        try:
            out, _ = self.losses()
        finally:
            for h in hooks:
                h.remove()
        self.outputs = out
        return calls

    def part_fns(self) -> Dict[str, callable]:
        calls = self.capture()
        model = self.model

        def attention():
            for mod, args in calls["attention"]:
                args = [a.clone().requires_grad_() for a in args]
                with self._autocast():
                    out, attn = mod(*args)
                (out.float().square().mean() + attn.float().square().mean()).backward()

        def mixing():
            for (pre, mixer), args in calls["spatial_mixing"]:
                x = args[0].clone().requires_grad_()
                with self._autocast():
                    y = mixer(pre(x)) if pre is not None else mixer(x)
                y.float().square().mean().backward()

        def backbone():
            with self._autocast():
                a, fa = model.backbone(self.x_lab, return_features=True)
                b, fb = model.backbone(self.x_unlab, return_features=True)
            loss = a.float().mean() + b.float().mean() + sum(f.float().mean() for f in fa + fb)
            loss.backward()

        def losses():
            o = self.outputs
            leaf = lambda t: t.detach().clone().requires_grad_()
            out = type(o)(**{k: ([leaf(t) for t in v] if isinstance(v, list) else (leaf(v) if torch.is_tensor(v) else v))
                             for k, v in vars(o).items()})
            icl_losses(out, self.y_lab, self.classes, self.weights)["total"].backward()

        def optimizer():
            self.opt.step()

        self.step()  # grads exist for the optimiser part
        return {"backbone": backbone, "attention": attention, "spatial_mixing": mixing, "losses": losses,
                "optimizer": optimizer}


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    device, dtype = args.device, args.dtype
    env = common.environment(device)
    rec = common.Recorder(OP, env)
    mem_limit = None
    if device.type == "cpu":
        try:
            import os

            mem_limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            mem_limit = None
    providers = ["published-formulation", "icl-fused-mlp", "icl-fused-conv"]
    # --quick is a smoke run: one warm-up and three timed calls per measurement
    reps = dict(warmup=1, min_samples=3) if args.quick else {}
    for label, arch, patch, lb, ub, classes, reduced in configs(device, args.quick):
        shape = common.shape_str(**dict(kv.split("=") for kv in label.split(";")), B=f"{lb}+{ub}",
                                 patch="x".join(map(str, patch)), K=classes)
        if reduced and not args.quick:
            shape += ";reduced=1"
        for prov in providers:
            need = mlp_params(arch, patch) * 4 * 3 if prov != "icl-fused-conv" else 0  # params + grads + momentum
            if device.type == "cpu" and not reduced and not args.quick and need:
                rec.add(prov, "fwd+bwd", shape, dtype, "time",
                        f"skipped: the spatial MLP needs {need / 2**30:.1f} GiB for parameters, gradients and momentum "
                        "(more than half of this machine's memory with activations); see the reduced shape")
                continue
            if mem_limit is not None and need > 0.6 * mem_limit:
                rec.add(prov, "fwd+bwd", shape, dtype, "time", "oom")
                continue
            try:
                st = Step(prov, arch, patch, lb, ub, classes, device, dtype)
                vals = common.time_fn(st.step, device, args.min_time, **reps)
                rec.add(prov, "fwd+bwd", shape, dtype, "time", "ms", vals)
                mem = common.peak_memory_mb(st.step, device)
                if mem is not None:
                    rec.add(prov, "fwd+bwd", shape, dtype, "peak_memory", "MiB", (mem, mem, mem))
                params = sum(p.numel() for p in st.model.parameters())
                rec.add(prov, "fwd+bwd", shape, dtype, "parameters", "count", (params, params, params))
                for part, fn in st.part_fns().items():
                    pv = common.time_fn(fn, device, args.min_time, **reps)
                    rec.add(prov, "fwd+bwd", f"{shape};part={part}", dtype, "time", "ms", pv)
                del st
            except Exception as exc:
                reason = "oom" if common.is_oom(exc) else f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                rec.add(prov, "fwd+bwd", shape, dtype, "time", reason)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            print(".", end="", flush=True)
    print()
    rec.print_table()
    rec.write_csv(args.csv)


if __name__ == "__main__":
    main()
