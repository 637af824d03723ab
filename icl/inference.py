"""Inference on whole images and volumes.

- 2D models: every slice along ``slice_axis`` is resized to the patch size,
  segmented (in batches), and its class probabilities resized back: bilinear
  both ways by default; ``interpolation="nearest"`` resizes both ways by
  nearest neighbour on the sample grid of ``scipy.ndimage.zoom(order=0)``, as
  the published ACDC evaluation does (zooming back the label map there; here
  the probabilities, whose argmax is the same).
- 3D models: a sliding window of the patch size (:func:`sliding_window`).
  Windows start at ``min(i * step, size - patch)`` per axis (the placement of
  the published BraTS scripts and of MONAI's ``sliding_window_inference``);
  the step is ``stride`` voxels, or ``floor(patch * (1 - overlap))`` (at least
  1, MONAI's rule), per axis. Window outputs (probabilities, or logits with
  ``blend="logits"``) are weighted (``constant``, or ``gaussian`` with sigma
  ``sigma_scale * patch`` as MONAI and nnU-Net), summed into preallocated
  tensors on the prediction device and divided by the summed weights.
  Volumes smaller than the patch are zero-padded (centred) and cropped back.
- Several models (an ensemble) and ``tta="flip"`` (every mirror of the spatial
  axes) are averaged per window in the blending space.
- ``output_shape``: the class probabilities are resampled (linear) to this
  grid before the argmax (the way back to a case's original grid).
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = Union[np.ndarray, torch.Tensor]

#: ``weighting`` values: every voxel of a window counts the same, or a Gaussian
#: centred on the window (less weight near its borders).
WEIGHTINGS = ("constant", "gaussian")
#: ``blend`` values: what the windows (and ensemble members, and mirrors) average.
BLENDS = ("probabilities", "logits")
#: ``tta`` values.
TTA_MODES = ("none", "flip")
#: ``sw_batch_size`` default of the command line (MONAI's value in the published AMOS script).
SW_BATCH_SIZE = 4
#: Window settings of published evaluations (``icl predict/evaluate --window-preset``):
#: the published BraTS scripts (val_3D.py, test_3D_BraTS.py) step 64 voxels per axis
#: and average softmax probabilities uniformly; the published AMOS scripts call MONAI's
#: ``sliding_window_inference`` with its defaults (overlap 0.25, constant weights, 4
#: windows a batch), which averages the network's logits; UA-MT's LA test steps 18, 18, 4.
WINDOW_PRESETS = {
    "published-brats": {"stride": (64, 64, 64), "weighting": "constant", "blend": "probabilities"},
    "published-amos": {"overlap": (0.25, 0.25, 0.25), "weighting": "constant", "blend": "logits",
                       "sw_batch_size": 4},
    "uamt-la": {"stride": (18, 18, 4), "weighting": "constant", "blend": "probabilities"},
}


def _net_of(model):
    """The module to call for inference (DDP / ICLNet -> backbone is fine: ICLNet.forward is inference)."""
    return getattr(model, "module", model)


def _spatial_dims(model, patch_size) -> int:
    from .models import UNet2D, UNet3D

    net = _net_of(model)
    bb = getattr(net, "backbone", net)
    if isinstance(bb, UNet2D):
        return 2
    if isinstance(bb, UNet3D):
        return 3
    if patch_size is not None:
        return len(patch_size)
    raise ValueError("predict: cannot tell whether the model is 2D or 3D; pass patch_size")


def _in_channels(model) -> Optional[int]:
    net = _net_of(model)
    bb = getattr(net, "backbone", net)
    return getattr(bb, "in_channels", None)


def _model_attr(net, *names):
    bb = getattr(net, "backbone", None)
    for n in names:
        for obj in (net, bb):
            v = getattr(obj, n, None) if obj is not None else None
            if v:
                return v
    return None


#: ``--amp`` values: none (float32), or the autocast dtype.
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_MODES = tuple(AMP_DTYPES)


def autocast(device: torch.device, amp: str):
    if amp in (None, "none"):
        return contextlib.nullcontext()
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def _as_channels_first(volume: ArrayLike, in_channels: Optional[int], dims: int) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(volume) if not isinstance(volume, torch.Tensor) else volume)
    x = x.float()
    c = in_channels or 1
    if dims == 2:
        # [H, W] | [C, H, W] | [D, H, W] (c == 1) | [C, D, H, W]
        if x.ndim == 2:
            x = x[None]
        elif x.ndim == 3 and not (c > 1 and x.shape[0] == c):
            x = x[None]
        if x.ndim not in (3, 4):
            raise ValueError(f"predict: a 2D model takes [H, W], [C, H, W] or [C, D, H, W] arrays, got {tuple(x.shape)}")
    else:
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise ValueError(f"predict: a 3D model takes [D, H, W] or [C, D, H, W] arrays, got {tuple(x.shape)}")
    if in_channels is not None and x.shape[0] != in_channels:
        raise ValueError(f"predict: the model takes {in_channels} channel(s), the input has {x.shape[0]} (shape {tuple(x.shape)})")
    return x


# ----------------------------------------------------------------------------- windows

def _per_axis(value, dims: int, what: str) -> tuple:
    vals = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if len(vals) == 1:
        vals = vals * dims
    if len(vals) != dims:
        raise ValueError(f"predict: {what} takes 1 or {dims} values (one per axis), got {len(vals)}")
    return vals


def window_steps(patch: Sequence[int], overlap: Union[float, Sequence[float]] = 0.5,
                 stride: Optional[Union[int, Sequence[int]]] = None) -> Tuple[int, ...]:
    """Per-axis steps between neighbouring windows: ``stride`` voxels when given, else
    ``max(1, floor(patch * (1 - overlap)))`` (MONAI's ``_get_scan_interval`` rule).
    ``overlap`` and ``stride`` take one value or one per axis."""
    dims = len(patch)
    if stride is not None:
        st = tuple(int(s) for s in _per_axis(stride, dims, "stride"))
        if any(s < 1 for s in st):
            raise ValueError(f"predict: stride must be positive, got {st}")
        return st
    ov = tuple(float(o) for o in _per_axis(overlap, dims, "overlap"))
    if any(not 0.0 <= o < 1.0 for o in ov):
        raise ValueError(f"predict: overlap must be in [0, 1), got {ov}")
    return tuple(max(1, int(p * (1.0 - o))) for p, o in zip(patch, ov))


def window_starts(size: int, patch: int, step: int) -> List[int]:
    """Window starts along one axis: ``ceil((size - patch) / step) + 1`` windows at
    ``min(i * step, size - patch)`` (one at 0 when the axis is not longer than the patch)."""
    if size <= patch:
        return [0]
    n = -(-(size - patch) // step) + 1
    return [min(i * step, size - patch) for i in range(n)]


def gaussian_weights(patch: Sequence[int], sigma_scale: Union[float, Sequence[float]] = 0.125,
                     device=None, dtype=torch.float32) -> torch.Tensor:
    """A window's importance map: the product over axes of exp(-x^2 / (2 sigma^2)), x the
    distance to the window's centre, sigma = sigma_scale * patch, floored at
    max(its minimum, 1e-3) (computed in float32, as MONAI's ``compute_importance_map``)."""
    scales = _per_axis(sigma_scale, len(patch), "sigma_scale")
    w = None
    for p, s in zip(patch, scales):
        x = torch.arange(-(p - 1) / 2.0, (p - 1) / 2.0 + 1, dtype=torch.float32)
        g = torch.exp(x ** 2 / (-2.0 * (p * float(s)) ** 2))
        w = g if w is None else w.unsqueeze(-1) * g
    w = w.clamp(min=max(float(w.min()), 1e-3))
    return w.to(device=device, dtype=dtype)


@torch.no_grad()
def sliding_window(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, patch: Sequence[int],
                   steps: Sequence[int], weighting: str = "constant", sw_batch_size: int = SW_BATCH_SIZE,
                   sigma_scale: Union[float, Sequence[float]] = 0.125, out_device=None,
                   progress: bool = False) -> torch.Tensor:
    """Blend ``fn`` over windows of ``x`` [C, *spatial] (on the device ``fn`` runs on).

    ``fn`` maps a batch of up to ``sw_batch_size`` windows [B, C, *patch] to
    [B, K, *patch]; its outputs, times the window weight, are summed into one
    [K, *padded] tensor and the weights into one [*padded] tensor, both
    preallocated on ``out_device`` (default: where ``fn``'s output lives), then
    divided. Returns [K, *spatial] in ``fn``'s output dtype.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"predict: window weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if sw_batch_size < 1:
        raise ValueError(f"predict: sw_batch_size must be positive, got {sw_batch_size}")
    patch = tuple(int(p) for p in patch)
    shape = tuple(x.shape[1:])
    pads = [(max(0, p - s) // 2, max(0, p - s) - max(0, p - s) // 2) for s, p in zip(shape, patch)]
    if any(sum(p) for p in pads):
        x = F.pad(x, [v for pr in reversed(pads) for v in pr])
    padded = tuple(x.shape[1:])
    grid = list(itertools.product(*[window_starts(s, p, st) for s, p, st in zip(padded, patch, steps)]))
    acc = wsum = w = None
    rng = range(0, len(grid), sw_batch_size)
    if progress:
        from tqdm import tqdm

        rng = tqdm(rng, desc="windows", leave=False)
    for b0 in rng:
        group = grid[b0:b0 + sw_batch_size]
        wins = [tuple(slice(a, a + p) for a, p in zip(st, patch)) for st in group]
        out = fn(torch.stack([x[(slice(None),) + s] for s in wins]))
        if acc is None:
            dev = torch.device(out_device) if out_device is not None else out.device
            acc = torch.zeros((out.shape[1],) + padded, dtype=out.dtype, device=dev)
            wsum = torch.zeros(padded, dtype=out.dtype, device=dev)
            if weighting == "gaussian":
                w = gaussian_weights(patch, sigma_scale, device=out.device, dtype=out.dtype)
            w_acc = w.to(dev) if w is not None else None
        if w is not None:
            out = out * w
        out = out.to(acc.device)
        for s, o in zip(wins, out):
            acc[(slice(None),) + s] += o
            if w_acc is None:
                wsum[s] += 1
            else:
                wsum[s] += w_acc
    acc /= wsum
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, shape))
    return acc[(slice(None),) + crop]


def _mirrors(dims: int, tta: str):
    """Axis tuples to flip (in a [B, C, *spatial] batch): () alone, or every subset of the spatial axes."""
    if tta == "none":
        return [()]
    axes = tuple(range(2, 2 + dims))
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def window_predictor(nets: Sequence[torch.nn.Module], device: torch.device, amp: str = "none",
                     tta: str = "none", blend: str = "probabilities") -> Callable[[torch.Tensor], torch.Tensor]:
    """batch [B, C, *patch] -> [B, K, *patch] (float32, or the network's float64) on ``device``: the mean over ``nets``
    and (``tta="flip"``) every mirror of the softmax probabilities (``blend="logits"``: of the
    logits), each mirrored prediction flipped back."""
    if tta not in TTA_MODES:
        raise ValueError(f"predict: tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    if blend not in BLENDS:
        raise ValueError(f"predict: blend must be one of {', '.join(BLENDS)}, got {blend!r}")

    def fn(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device)
        mirrors = _mirrors(batch.ndim - 2, tta)
        total = None
        for net in nets:
            for axes in mirrors:
                with autocast(device, amp):
                    out = net(batch.flip(axes) if axes else batch)
                if isinstance(out, (tuple, list)):
                    out = out[0]
                if out.dtype in (torch.float16, torch.bfloat16):
                    out = out.float()  # autocast outputs; float32/float64 networks keep their dtype
                if blend == "probabilities":
                    out = torch.softmax(out, dim=1)
                if axes:
                    out = out.flip(axes)
                total = out if total is None else total + out
        n = len(nets) * len(mirrors)
        return total if n == 1 else total / n

    return fn


# ----------------------------------------------------------------------------- resampling

def _linear_mode(ndim: int) -> str:
    return {1: "linear", 2: "bilinear", 3: "trilinear"}[ndim]


def resample_probabilities(probs: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """[K, *s] -> [K, *shape], linear per class on the grid of ``preprocess.resample_image``
    (voxel edges aligned: ``align_corners=False``, edges repeated), on the tensor's device."""
    shape = tuple(int(s) for s in shape)
    if tuple(probs.shape[1:]) == shape:
        return probs
    out = torch.empty((probs.shape[0],) + shape, dtype=probs.dtype, device=probs.device)
    mode = _linear_mode(len(shape))
    for c in range(probs.shape[0]):  # one class at a time: no second full-size temporary
        out[c] = F.interpolate(probs[c][None, None], size=shape, mode=mode, align_corners=False)[0, 0]
    return out


def argmax_resampled(probs: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``resample_probabilities(probs, shape).argmax(0)`` holding one resampled class at a time
    (ties go to the lower class, as argmax)."""
    shape = tuple(int(s) for s in shape)
    if tuple(probs.shape[1:]) == shape:
        return probs.argmax(0)
    mode = _linear_mode(len(shape))
    best = labels = None
    for c in range(probs.shape[0]):
        v = F.interpolate(probs[c][None, None], size=shape, mode=mode, align_corners=False)[0, 0]
        if best is None:
            best, labels = v, torch.zeros(shape, dtype=torch.long, device=probs.device)
        else:
            better = v > best
            labels[better] = c
            best = torch.maximum(best, v)
    return labels


# ----------------------------------------------------------------------------- predict

@torch.no_grad()
def predict(
    model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
    volume: ArrayLike,
    patch_size: Optional[Sequence[int]] = None,
    slice_axis: int = 0,
    overlap: Union[float, Sequence[float]] = 0.5,
    batch_size: int = 8,
    device: Optional[Union[str, torch.device]] = None,
    amp: str = "none",
    return_probs: bool = False,
    progress: bool = False,
    interpolation: Optional[str] = None,
    stride: Optional[Union[int, Sequence[int]]] = None,
    weighting: str = "constant",
    blend: str = "probabilities",
    sw_batch_size: Optional[int] = None,
    tta: str = "none",
    output_shape: Optional[Sequence[int]] = None,
    stitch_device: Optional[Union[str, torch.device]] = None,
    sigma_scale: Union[float, Sequence[float]] = 0.125,
):
    """Segment one image or volume.

    model: a network, or a list of networks (an ensemble: their outputs are
    averaged per window; they must take the same input and give the same classes).
    volume: numpy array or tensor, [*spatial] or [C, *spatial] (a 2D model also
    takes a volume and segments it slice by slice along ``slice_axis``, a
    spatial axis). patch_size: the training patch (default: ``model.patch_size``).
    interpolation: ``"linear"`` or ``"nearest"`` (the published 2D evaluation),
    how 2D models resize slices to the patch and back; default: the model's
    ``icl_interpolation`` (set from a checkpoint's run), else ``"linear"``.
    3D windows: ``overlap`` (one value or one per axis) or ``stride`` (voxels),
    ``weighting`` (``"constant"`` or ``"gaussian"``), ``sw_batch_size`` windows
    per forward pass (default ``batch_size``). ``blend``: average probabilities
    (default) or logits (softmax after blending). ``tta="flip"``: also every
    mirror of the spatial axes, averaged. ``output_shape``: resample the
    probabilities (linear) to this spatial shape before the argmax.
    ``stitch_device``: where the blended volume is held (default: ``device``).
    Returns the label map (int64, [*spatial]); with ``return_probs`` also the
    class probabilities [K, *spatial] (float32).
    """
    nets = [_net_of(m) for m in (model if isinstance(model, (list, tuple)) else [model])]
    if not nets:
        raise ValueError("predict: no model given")
    net = nets[0]
    if patch_size is None:
        patch_size = _model_attr(net, "icl_patch_size", "patch_size")
    if not patch_size:
        raise ValueError("predict: patch_size is required (the model has no patch_size attribute)")
    patch_size = tuple(int(p) for p in patch_size)
    if interpolation is None:
        interpolation = _model_attr(net, "icl_interpolation") or "linear"
    if interpolation not in ("linear", "nearest"):
        raise ValueError(f"predict: interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    dims = _spatial_dims(net, patch_size)
    if len(patch_size) != dims:
        raise ValueError(f"predict: patch_size {patch_size} does not fit a {dims}D model")
    for other in nets[1:]:
        if _spatial_dims(other, patch_size) != dims or _in_channels(other) != _in_channels(net):
            raise ValueError("predict: the ensemble's models differ in dimensions or input channels")
    if device is None:
        device = next(net.parameters()).device
    device = torch.device(device)
    stitch = torch.device(stitch_device) if stitch_device is not None else device
    fn = window_predictor(nets, device, amp, tta, blend)
    modes = [n.training for n in nets]
    for n in nets:
        n.eval()
    try:
        x = _as_channels_first(volume, _in_channels(net), dims)
        if dims == 2:
            out = _predict_2d(fn, x, patch_size, slice_axis, batch_size, device, stitch, progress, interpolation)
        else:
            steps = window_steps(patch_size, overlap, stride)
            out = sliding_window(fn, x.to(device), patch_size, steps, weighting,
                                 sw_batch_size or batch_size, sigma_scale, stitch, progress)
    finally:
        for n, m in zip(nets, modes):
            n.train(m)
    if blend == "logits":
        out = torch.softmax(out, dim=0)
    if output_shape is not None and not return_probs:
        return argmax_resampled(out, output_shape).cpu().numpy().astype(np.int64)
    if output_shape is not None:
        out = resample_probabilities(out, output_shape)
    labels = out.argmax(0).cpu().numpy().astype(np.int64)
    if return_probs:
        return labels, out.cpu().numpy()
    return labels


def zoom_indices(src: int, dst: int) -> torch.Tensor:
    """Source index of each of ``dst`` outputs for a nearest-neighbour resize of ``src``
    samples, on the grid of ``scipy.ndimage.zoom(order=0, grid_mode=False)``: output
    i reads input round(i * (src - 1) / (dst - 1)), halves rounded up."""
    if dst == 1 or src == 1:
        return torch.zeros(dst, dtype=torch.long)
    pos = torch.arange(dst, dtype=torch.float64) * ((src - 1) / (dst - 1))
    return torch.floor(pos + 0.5).long().clamp_(0, src - 1)


def _resize_nearest(t: torch.Tensor, size) -> torch.Tensor:
    """[B, C, h, w] -> [B, C, *size] by ``zoom_indices`` along each axis."""
    h, w = t.shape[-2:]
    return t.index_select(-2, zoom_indices(h, size[0]).to(t.device)).index_select(-1, zoom_indices(w, size[1]).to(t.device))


def _resize(t: torch.Tensor, size, interpolation: str) -> torch.Tensor:
    if interpolation == "nearest":
        return _resize_nearest(t, size)
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def _predict_2d(fn, x, patch, slice_axis, batch_size, device, stitch, progress, interpolation="linear"):
    single = x.ndim == 3
    if single:
        x = x.unsqueeze(1)  # [C, 1, H, W]
        slice_axis = 0
    if not 0 <= slice_axis < 3:
        raise ValueError(f"predict: slice_axis must be 0, 1 or 2, got {slice_axis}")
    xs = x.movedim(1 + slice_axis, 1)  # [C, D, h, w]
    D, h, w = xs.shape[1:]
    slices = xs.permute(1, 0, 2, 3)  # [D, C, h, w]
    out = None
    rng = range(0, D, batch_size)
    if progress:
        from tqdm import tqdm

        rng = tqdm(rng, desc="slices", leave=False)
    for s in rng:
        b = slices[s:s + batch_size].to(device)
        if (h, w) != patch:
            b = _resize(b, patch, interpolation)
        p = fn(b)
        if (h, w) != patch:
            p = _resize(p, (h, w), interpolation)
        if out is None:
            out = torch.empty((p.shape[1], D, h, w), dtype=p.dtype, device=stitch)
        out[:, s:s + p.shape[0]] = p.permute(1, 0, 2, 3).to(stitch)
    out = out.movedim(1, 1 + slice_axis)
    return out[:, 0] if single else out
