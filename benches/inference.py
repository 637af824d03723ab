"""Benchmark of whole-case prediction: 2D slice by slice and 3D sliding windows, icl against MONAI.

Run from a checkout:  python -m benches.inference [--quick] [--csv FILE] [--device cuda]

One network per shape (the published UNet2D / UNet3D, random weights, eval
mode), one case of random intensities; every provider runs the same network on
the same windows:
  icl-constant / icl-gaussian      ``icl.predict`` (windows stitched on the device,
                                   ``--sw-batch-size`` windows per pass), constant or
                                   Gaussian window weights, softmax probabilities blended
  monai-constant / monai-gaussian  MONAI's ``sliding_window_inference`` over the
                                   softmax of the same network, same windows and batch
  icl-flip                         ``icl.predict(tta="flip")`` (8 mirrors in 3D, 4 in 2D)
  icl-stitch-cpu                   (GPU only) windows on the GPU, the blended volume on the host
2D: the slices of a volume at the patch size, ``icl.predict`` against
``sliding_window_inference`` over the slices as a batch of images.
Rows: ``time`` (ms per case), ``cases_per_s``, ``peak_memory`` (MiB: GPU allocated
beyond the inputs; CPU: the rise of the process's peak resident set after the
warm-up, where Linux lets it be reset: the allocator's reuse hides most of it), and ``max_abs_diff`` info rows (icl against MONAI, probabilities).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from icl.inference import predict
from icl.models import UNet2D, UNet3D

from . import common

OP = "inference"


def configs(quick: bool, gpu: bool = False):
    """(dims, volume shape, patch, overlap, sw batch size, classes). On a GPU the full run
    adds the published sizes: ACDC slices at 256x256 and a BraTS-like volume at 96^3 windows."""
    if quick:
        return [(2, (4, 64, 64), (64, 64), 0.0, 4, 3), (3, (40, 40, 24), (32, 32, 16), 0.5, 2, 3)]
    small = [(2, (16, 128, 128), (128, 128), 0.0, 8, 4), (3, (80, 80, 48), (48, 48, 32), 0.5, 4, 3)]
    if not gpu:
        return small
    return small + [(2, (10, 256, 256), (256, 256), 0.0, 10, 4), (3, (160, 192, 160), (96, 96, 96), 0.5, 4, 4)]


def _rss_peak_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return common.peak_memory_mb(fn, device)
    if not _rss_peak_reset():
        return None
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    if before is None or peak is None:
        return None
    return max(peak - before, 0) / 1024.0


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    device = args.device
    env = common.environment(device)
    rec = common.Recorder(OP, env)
    reps = dict(warmup=1, min_samples=3)
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        sliding_window_inference = None
    diffs = []
    for dims, vol, patch, overlap, swb, K in configs(args.quick, device.type == "cuda"):
        torch.manual_seed(0)
        net = (UNet2D(1, K) if dims == 2 else UNet3D(1, K)).to(device).eval()
        x = torch.randn(vol)
        shape = common.shape_str(dims=f"{dims}D", volume="x".join(map(str, vol)), patch="x".join(map(str, patch)),
                                 overlap=overlap, sw=swb, K=K)
        mode = "slices" if dims == 2 else "windows"
        kw = dict(patch_size=patch, overlap=overlap, batch_size=swb, sw_batch_size=swb, device=device)
        providers = {
            "icl-constant": lambda: predict(net, x, **kw, return_probs=True)[1],
            "icl-gaussian": lambda: predict(net, x, **kw, weighting="gaussian", return_probs=True)[1],
            "icl-flip": lambda: predict(net, x, **kw, tta="flip", return_probs=True)[1],
        }
        if device.type == "cuda":
            providers["icl-stitch-cpu"] = lambda: predict(net, x, **kw, stitch_device="cpu", return_probs=True)[1]
        if sliding_window_inference is not None:
            def softmax_net(b):
                return torch.softmax(net(b), 1)

            def monai(weighting):
                def run():
                    with torch.no_grad():
                        xin = x.to(device)
                        inp = xin[:, None] if dims == 2 else xin[None, None]  # 2D: slices as a batch of images
                        out = sliding_window_inference(inp, patch, swb, softmax_net, overlap=overlap, mode=weighting)
                        out = out.permute(1, 0, 2, 3) if dims == 2 else out[0]
                        return out.cpu().numpy()
                return run
            providers["monai-constant"] = monai("constant")
            providers["monai-gaussian"] = monai("gaussian")
        else:
            for name in ("monai-constant", "monai-gaussian"):
                rec.add(name, mode, shape, torch.float32, "time", "skipped: MONAI not installed")
        outputs = {}
        for name, fn in providers.items():
            try:
                outputs[name] = fn()
                vals = common.time_fn(fn, device, args.min_time, **reps)
                rec.add(name, mode, shape, torch.float32, "time", "ms", vals)
                rec.add(name, mode, shape, torch.float32, "cases_per_s", "1/s", tuple(1e3 / v for v in vals))
                mem = peak_memory_mib(fn, device)
                if mem:
                    rec.add(name, mode, shape, torch.float32, "peak_memory", "MiB", (mem, mem, mem))
            except Exception as exc:
                reason = "oom" if common.is_oom(exc) else common.error_reason(exc)
                rec.add(name, mode, shape, torch.float32, "time", reason)
            print(".", end="", flush=True)
        for a, b in (("icl-constant", "monai-constant"), ("icl-gaussian", "monai-gaussian")):
            if a in outputs and b in outputs:
                d = float(abs(torch.as_tensor(outputs[a]) - torch.as_tensor(outputs[b])).max())
                diffs.append((shape, a, b, d))
                rec.add(a, mode, shape, torch.float32, "max_abs_diff", f"info: {d:.3g} against {b}")
    print()
    rec.print_table(extra={"cases_per_s": "cases/s", "peak_memory": "peak MiB"})
    for shape, a, b, d in diffs:
        print(f"{shape}: max |{a} - {b}| = {d:.3g}")
    rec.write_csv(args.csv)


if __name__ == "__main__":
    main()
