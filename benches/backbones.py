"""Benchmark of one ICL training step on each backbone icl can put ICL on.

Run from a checkout:  python -m benches.backbones [--quick] [--csv FILE] [--device cuda]

Providers (the ICL heads are the default ones: conv mixer, batch-mean global
queries; one step = both backbone passes, SSPA twice, USCL once, the four
losses, backward and an SGD step):
  unet2d            the published 2D UNet (build_model("unet2d"))
  basicunet2d       MONAI's BasicUNet (16..256) with icl.attach on upcat_4/3/2
  swinunetr2d       MONAI's SwinUNETR, 2D, feature size 48 (build_model("swinunetr"))
  swinunet2d        the published Swin-Unet (lite config, 224x224; quick: 64x64, narrow) (build_model("swinunet"))
  unet3d            the published 3D UNet (build_model("unet3d"))
  swinunetr3d       MONAI's SwinUNETR, 3D, feature size 48 (the published BraTS setting)
Rows: ``time`` (ms per step), ``parameters`` (the whole ICL model) and
``backbone_parameters``. MONAI providers write a ``skipped`` row without MONAI.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from icl.losses import LossWeights, icl_losses
from icl.models import attach, build_model

from . import common

OP = "backbones"


def configs(quick: bool) -> List[Tuple[str, Tuple[int, ...], int, int, int]]:
    """(provider, patch, labeled_bs, unlabeled_bs, classes)."""
    if quick:
        return [("unet2d", (64, 64), 1, 1, 3), ("basicunet2d", (64, 64), 1, 1, 3), ("swinunetr2d", (64, 64), 1, 1, 3),
                ("swinunet2d", (64, 64), 1, 1, 3)]
    return [("unet2d", (96, 96), 2, 2, 4), ("basicunet2d", (96, 96), 2, 2, 4), ("swinunetr2d", (96, 96), 2, 2, 4),
            ("swinunet2d", (224, 224), 2, 2, 4),
            ("unet3d", (64, 64, 64), 1, 1, 2), ("swinunetr3d", (64, 64, 64), 1, 1, 2)]


def make_model(provider: str, patch, classes: int, quick: bool):
    if provider in ("unet2d", "unet3d"):
        return build_model(provider, 1, classes, patch)
    if provider == "swinunet2d":  # built for one input size: 224 published; quick: narrow, window 4
        opts = dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4) if quick else {}
        return build_model("swinunet", 1, classes, patch, **opts)
    if provider.startswith("swinunetr"):
        opts = dict(feature_size=12, depths=(1, 1, 1, 1)) if quick else dict(feature_size=48)
        return build_model("swinunetr", 1, classes, patch, **opts)
    if provider == "basicunet2d":
        from monai.networks.nets import BasicUNet

        bb = BasicUNet(spatial_dims=2, in_channels=1, out_channels=classes, features=(16, 32, 64, 128, 256, 32))
        return attach(bb, classes, feature_modules=["upcat_4", "upcat_3", "upcat_2"], patch_size=patch)
    raise ValueError(provider)


def main() -> None:
    args = common.parse_args(
        __doc__.splitlines()[0],
        lambda p: p.add_argument("--providers", help="comma-separated subset of unet2d, basicunet2d, swinunetr2d, "
                                                     "swinunet2d, unet3d, swinunetr3d (default: all)"))
    chosen = None if not args.providers else {x.strip() for x in args.providers.split(",") if x.strip()}
    device, dtype = args.device, args.dtype
    env = common.environment(device)
    rec = common.Recorder(OP, env)
    reps = dict(warmup=1, min_samples=3) if args.quick else dict(warmup=1, min_samples=5)
    try:
        import einops  # noqa: F401
        import monai  # noqa: F401

        has_monai = True
    except ImportError:
        has_monai = False
    for prov, patch, lb, ub, K in configs(args.quick):
        if chosen is not None and prov not in chosen:
            continue
        shape = common.shape_str(patch="x".join(map(str, patch)), B=f"{lb}+{ub}", K=K)
        if prov not in ("unet2d", "unet3d", "swinunet2d") and not has_monai:
            rec.add(prov, "fwd+bwd", shape, dtype, "time", "skipped: MONAI not installed (pip install 'icl-kernels[monai]')")
            continue
        try:
            torch.manual_seed(0)
            net = make_model(prov, patch, K, args.quick).to(device).train()
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
            x_lab = torch.randn((lb, 1) + patch, device=device)
            x_unlab = torch.randn((ub, 1) + patch, device=device)
            y = torch.randint(0, K, (lb,) + patch, device=device)
            weights = LossWeights.published(len(patch))
            amp = device.type == "cuda" and dtype != torch.float32

            def step():
                with torch.autocast(device.type, dtype=dtype, enabled=amp):
                    out = net.forward_train(x_lab, x_unlab, y)
                    loss = icl_losses(out, y, K, weights)["total"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            vals = common.time_fn(step, device, args.min_time, **reps)
            rec.add(prov, "fwd+bwd", shape, dtype, "time", "ms", vals)
            n = sum(p.numel() for p in net.parameters())
            nb = sum(p.numel() for p in net.backbone.parameters())
            rec.add(prov, "fwd+bwd", shape, dtype, "parameters", "count", (n, n, n))
            rec.add(prov, "fwd+bwd", shape, dtype, "backbone_parameters", "count", (nb, nb, nb))
            del net, opt
        except Exception as exc:
            reason = "oom" if common.is_oom(exc) else f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            rec.add(prov, "fwd+bwd", shape, dtype, "time", reason)
        print(".", end="", flush=True)
    print()
    rec.print_table(extra={"parameters": "params", "backbone_parameters": "backbone"})
    rec.write_csv(args.csv)


if __name__ == "__main__":
    main()
