"""Inference on whole images and volumes.

- 2D models: every slice along ``slice_axis`` is resized to the patch size,
  segmented (in batches), and its class probabilities resized back: bilinear
  both ways by default; ``interpolation="nearest"`` resizes both ways by
  nearest neighbour on the sample grid of ``scipy.ndimage.zoom(order=0)``, as
  the published ACDC evaluation does (zooming back the label map there; here
  the probabilities, whose argmax is the same).
- 3D models: a sliding window of the patch size with ``overlap`` (fraction of
  the patch shared by neighbouring windows), probabilities averaged; volumes
  smaller than the patch are zero-padded (centred) and cropped back.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = Union[np.ndarray, torch.Tensor]


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


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    volume: ArrayLike,
    patch_size: Optional[Sequence[int]] = None,
    slice_axis: int = 0,
    overlap: float = 0.5,
    batch_size: int = 8,
    device: Optional[Union[str, torch.device]] = None,
    amp: str = "none",
    return_probs: bool = False,
    progress: bool = False,
    interpolation: Optional[str] = None,
):
    """Segment one image or volume.

    volume: numpy array or tensor, [*spatial] or [C, *spatial] (a 2D model also
    takes a volume and segments it slice by slice along ``slice_axis``, a
    spatial axis). patch_size: the training patch (default: ``model.patch_size``).
    interpolation: ``"linear"`` or ``"nearest"`` (the published 2D evaluation),
    how 2D models resize slices to the patch and back; default: the model's
    ``icl_interpolation`` (set from a checkpoint's run), else ``"linear"``.
    Returns the label map (int64, [*spatial]); with ``return_probs`` also the
    class probabilities [K, *spatial] (float32).
    """
    net = _net_of(model)
    if patch_size is None:
        bb = getattr(net, "backbone", None)
        patch_size = (getattr(net, "icl_patch_size", None) or getattr(bb, "icl_patch_size", None)
                      or getattr(net, "patch_size", None) or getattr(bb, "patch_size", None))
    if not patch_size:
        raise ValueError("predict: patch_size is required (the model has no patch_size attribute)")
    patch_size = tuple(int(p) for p in patch_size)
    if interpolation is None:
        interpolation = (getattr(net, "icl_interpolation", None)
                         or getattr(getattr(net, "backbone", None), "icl_interpolation", None) or "linear")
    if interpolation not in ("linear", "nearest"):
        raise ValueError(f"predict: interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    dims = _spatial_dims(net, patch_size)
    if len(patch_size) != dims:
        raise ValueError(f"predict: patch_size {patch_size} does not fit a {dims}D model")
    if device is None:
        device = next(net.parameters()).device
    device = torch.device(device)
    was_training = net.training
    net.eval()
    try:
        x = _as_channels_first(volume, _in_channels(net), dims)
        if dims == 2:
            probs = _predict_2d(net, x, patch_size, slice_axis, batch_size, device, amp, progress, interpolation)
        else:
            probs = _predict_3d(net, x, patch_size, overlap, batch_size, device, amp, progress)
    finally:
        net.train(was_training)
    labels = probs.argmax(0).numpy().astype(np.int64)
    if return_probs:
        return labels, probs.numpy()
    return labels


def _forward(net, batch, device, amp):
    with autocast(device, amp):
        out = net(batch.to(device))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return torch.softmax(out.float(), dim=1)


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


def _predict_2d(net, x, patch, slice_axis, batch_size, device, amp, progress, interpolation="linear"):
    single = x.ndim == 3
    if single:
        x = x.unsqueeze(1)  # [C, 1, H, W]
        slice_axis = 0
    C = x.shape[0]
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
        b = slices[s:s + batch_size]
        if (h, w) != patch:
            b = _resize(b, patch, interpolation)
        p = _forward(net, b, device, amp)
        if (h, w) != patch:
            p = _resize(p, (h, w), interpolation)
        p = p.cpu()
        if out is None:
            out = torch.empty((p.shape[1], D, h, w), dtype=torch.float32)
        out[:, s:s + p.shape[0]] = p.permute(1, 0, 2, 3)
    out = out.movedim(1, 1 + slice_axis)
    return out[:, 0] if single else out


def _starts(size: int, patch: int, step: int):
    if size <= patch:
        return [0]
    n = int(np.ceil((size - patch) / step)) + 1
    return sorted({min(i * step, size - patch) for i in range(n)})


def _predict_3d(net, x, patch, overlap, batch_size, device, amp, progress):
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"predict: overlap must be in [0, 1), got {overlap}")
    C = x.shape[0]
    shape = tuple(x.shape[1:])
    pads = [(max(0, p - s) // 2, max(0, p - s) - max(0, p - s) // 2) for s, p in zip(shape, patch)]
    if any(sum(p) for p in pads):
        flat = [v for pr in reversed(pads) for v in pr]
        x = F.pad(x, flat)
    padded = tuple(x.shape[1:])
    steps = [max(1, int(round(p * (1.0 - overlap)))) for p in patch]
    starts = list(itertools.product(*[_starts(s, p, st) for s, p, st in zip(padded, patch, steps)]))
    acc = None
    cnt = torch.zeros(padded, dtype=torch.float32)
    it = range(0, len(starts), batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="windows", leave=False)
    for b0 in it:
        group = starts[b0:b0 + batch_size]
        batch = torch.stack([x[(slice(None),) + tuple(slice(a, a + p) for a, p in zip(st, patch))] for st in group])
        p = _forward(net, batch, device, amp).cpu()
        if acc is None:
            acc = torch.zeros((p.shape[1],) + padded, dtype=torch.float32)
        for st, pi in zip(group, p):
            sl = tuple(slice(a, a + q) for a, q in zip(st, patch))
            acc[(slice(None),) + sl] += pi
            cnt[sl] += 1
    acc /= cnt.clamp_min(1)
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, shape))
    return acc[(slice(None),) + crop]
