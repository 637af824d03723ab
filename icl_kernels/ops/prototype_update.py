"""The fused momentum prototype update: custom ops, fake tensors, autograd,
backend dispatch, the data-parallel reduction and the in-place blend.

Two user functions, one kernel contract.  The kernels (``cpu``, ``cuda``,
``triton``, ``torch`` backends) compute, in one pass over the features,

    sums[k]   = sum_{b, n} w(b, k, n) * features[b, :, n]     -> [K, C]
    totals[k] = sum_{b, n} w(b, k, n)                           -> [K]

with w(b, k, n) = [labels[b, n] == k] (times a per-token weight) for integer
labels, or probs[b, k, n] for soft weights.  Nothing [B, K, N]-sized is
built.  Everything after that is [K, C]-sized PyTorch: the optional all-reduce
(sum) of sums and totals over the ranks, means = sums / totals for classes
with totals > 0 (0 elsewhere), and the in-place, gradient-free blend

    buffer[k] <- momentum * buffer[k] + (1 - momentum) * means[k]   if totals[k] > 0
    buffer[k] <- means[k] (and initialized[k] <- True)              if also not initialized[k]

A class with totals[k] <= 0 keeps its buffer row bit for bit.

Data parallel: the reduction sums the ranks' sums and totals before the
division, so every rank gets the same means and buffer, and absence is judged
on the global totals.  Gradients stay local: d means / d local sums[k] =
1 / global totals[k] (the all-reduced value passes its gradient straight to
the local term, as DDP expects before it averages parameter gradients).
With ``deterministic=True`` the ranks' partial sums are all-gathered and added
in rank order (bitwise the same on every rank and run to run); with False a
plain all_reduce is used (one collective fewer buffer, order left to the
backend).
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _extension, backends
from ..reference import accumulation_dtype
from .proxy_attention import eager_path

OP = "prototype_update"
_VALUES_IGNORE_INDEX = -1  # the values form labels every row 0..K-1: nothing is ignored


def _kernels(name: str, device: torch.device):
    return backends.resolve(OP, name, device).kernels(OP)


# As in proxy_attention: ``kern`` is the resolved (forward, backward) pair for an
# eager call on plain tensors (kernels called directly) or the backend name for a
# traced one (the registered ops below).


def _run_forward(features, labels, weights, probs, num_classes, ignore_index, check_labels, deterministic, kern):
    if isinstance(kern, str):
        return torch.ops.icl_kernels.prototype_class_sums.default(
            features, labels, weights, probs, num_classes, ignore_index, check_labels, deterministic, kern)
    sums, totals = kern[0](features, labels, weights, probs, num_classes, ignore_index, check_labels, deterministic)
    return sums.contiguous(), totals.contiguous()


def _run_backward(grad_sums, grad_totals, features, labels, weights, probs, ignore_index, need_f, need_aux, kern):
    """(grad_features, grad_aux); a gradient not asked for is an empty [0] tensor."""
    if isinstance(kern, str):
        return torch.ops.icl_kernels.prototype_class_sums_backward.default(
            grad_sums, grad_totals, features, labels, weights, probs, ignore_index, need_f, need_aux, kern)
    gf, ga = kern[1](grad_sums, grad_totals, features, labels, weights, probs, ignore_index, need_f, need_aux)
    aux = probs if probs is not None else weights
    gf = _like(features, gf) if need_f else features.new_empty(0)
    ga = _like(aux, ga) if need_aux else features.new_empty(0)
    return gf, ga


def _like(ref: Tensor, t: Tensor) -> Tensor:
    """t with ref's memory layout (what the fake implementations promise)."""
    want = torch.empty_like(ref)
    if want.stride() == t.stride():
        return t
    return want.copy_(t)


# ---------------------------------------------------------------- custom ops


@torch.library.custom_op("icl_kernels::prototype_class_sums", mutates_args=())
def _sums_op(
    features: Tensor,
    labels: Optional[Tensor],
    weights: Optional[Tensor],
    probs: Optional[Tensor],
    num_classes: int,
    ignore_index: int,
    check_labels: bool,
    deterministic: bool,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    return _run_forward(features, labels, weights, probs, num_classes, ignore_index, check_labels, deterministic,
                        _kernels(backend, features.device))


@_sums_op.register_fake
def _sums_fake(features, labels, weights, probs, num_classes, ignore_index, check_labels, deterministic, backend):
    K = probs.shape[1] if probs is not None else num_classes
    acc = accumulation_dtype(features.dtype)
    return features.new_empty(K, features.shape[1], dtype=acc), features.new_empty(K, dtype=acc)


@torch.library.custom_op("icl_kernels::prototype_class_sums_backward", mutates_args=())
def _sums_backward_op(
    grad_sums: Tensor,
    grad_totals: Tensor,
    features: Tensor,
    labels: Optional[Tensor],
    weights: Optional[Tensor],
    probs: Optional[Tensor],
    ignore_index: int,
    need_features_grad: bool,
    need_aux_grad: bool,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """(grad_features, grad_aux) where aux is probs or weights; a gradient not asked for is an empty [0] tensor."""
    return _run_backward(grad_sums, grad_totals, features, labels, weights, probs, ignore_index, need_features_grad,
                         need_aux_grad, _kernels(backend, features.device))


@_sums_backward_op.register_fake
def _sums_backward_fake(grad_sums, grad_totals, features, labels, weights, probs, ignore_index, need_features_grad,
                        need_aux_grad, backend):
    aux = probs if probs is not None else weights
    gf = torch.empty_like(features) if need_features_grad else features.new_empty(0)
    ga = torch.empty_like(aux) if need_aux_grad else features.new_empty(0)
    return gf, ga


# -- the autograd definition: one, used by the registered op and by the eager Function


def _setup_context(ctx, inputs, output):
    features, labels, weights, probs, num_classes, ignore_index, _check, _det, kern = inputs
    ctx.save_for_backward(features, labels, weights, probs)
    ctx.ignore_index = ignore_index
    ctx.kern = kern
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_sums, grad_totals):
    features, labels, weights, probs = ctx.saved_tensors
    need_f = ctx.needs_input_grad[0]
    aux_index = 3 if probs is not None else 2
    need_aux = (probs is not None or weights is not None) and ctx.needs_input_grad[aux_index]
    grads = [None] * 9
    if not (need_f or need_aux) or (grad_sums is None and grad_totals is None):
        return tuple(grads)
    K = probs.shape[1] if probs is not None else None
    acc = accumulation_dtype(features.dtype)
    if grad_sums is None:
        grad_sums = features.new_zeros(grad_totals.shape[0], features.shape[1], dtype=acc)
    if grad_totals is None:
        grad_totals = features.new_zeros(grad_sums.shape[0] if K is None else K, dtype=acc)
    gf, ga = _run_backward(grad_sums.contiguous(), grad_totals.contiguous(), features, labels, weights, probs,
                           ctx.ignore_index, need_f, need_aux, ctx.kern)
    grads[0] = gf if need_f else None
    grads[aux_index] = ga if need_aux else None
    return tuple(grads)


_sums_op.register_autograd(_backward, setup_context=_setup_context)


def _means(sums: Tensor, totals: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(means, present, denom): sums / totals for classes with totals > 0, 0 elsewhere."""
    present = totals > 0
    denom = torch.where(present, totals, torch.ones_like(totals))
    means = torch.where(present.unsqueeze(1), sums / denom.unsqueeze(1), torch.zeros_like(sums))
    return means, present, denom


class _EagerClassMeans(torch.autograd.Function):
    """Class sums (the registered op's autograd definition, :func:`_setup_context`
    / :func:`_backward`, over directly called kernels), the data-parallel
    reduction and the division, as one autograd node: eager calls skip the
    custom-op machinery and the division's graph, which together cost several
    times the kernels' host time at training sizes."""

    @staticmethod
    def forward(ctx, features, labels, weights, probs, num_classes, ignore_index, check_labels, deterministic, kern,
                group):
        inputs = (features, labels, weights, probs, num_classes, ignore_index, check_labels, deterministic, kern)
        sums, totals = _run_forward(*inputs)
        _setup_context(ctx, inputs, (sums, totals))
        if group is not None:
            sums, totals = _global_sums(sums, totals, group[0], deterministic)
        means, present, denom = _means(sums, totals)
        ctx.division = (means, present, denom)
        return means, totals

    @staticmethod
    def backward(ctx, grad_means, grad_totals):
        means, present, denom = ctx.division
        grad_sums = None
        if grad_means is not None:
            grad_sums = torch.where(present.unsqueeze(1), grad_means / denom.unsqueeze(1), torch.zeros_like(grad_means))
            if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:  # d means / d totals = -means / totals
                from_means = (grad_means * means).sum(1).div_(denom).neg_()
                grad_totals = from_means if grad_totals is None else grad_totals + from_means
        return _backward(ctx, grad_sums, grad_totals) + (None,)


def _class_means(features, labels, weights, probs, num_classes, ignore_index, check_labels, deterministic, name,
                 process_group) -> Tuple[Tensor, Tensor]:
    """(means, totals) over all ranks (see the module docstring), through the
    eager Function or the registered op; a named backend that cannot run fails here."""
    distributed, group = _group_for(process_group)
    if distributed and torch.distributed.get_world_size(group) == 1:
        distributed = False
    if eager_path(features, labels, weights, probs):
        return _EagerClassMeans.apply(features, labels, weights, probs, num_classes, ignore_index, check_labels,
                                      deterministic, _kernels(name, features.device),
                                      (group,) if distributed else None)
    if not torch.compiler.is_compiling():
        _kernels(name, features.device)
    sums, totals = torch.ops.icl_kernels.prototype_class_sums.default(
        features, labels, weights, probs, num_classes, ignore_index, check_labels, deterministic, name)
    if distributed:
        sums, totals = _global_sums(sums, totals, group, deterministic)
    means, _, _ = _means(sums, totals)
    return means, totals


# Fake implementations of the raw compiled kernels, so that they too can be
# traced (torch.compile, opcheck) when called directly.
if _extension.is_loaded() and _extension.has_kernel("_prototype_update_labels_forward", "CPU"):

    @torch.library.register_fake("icl_kernels::_prototype_update_labels_forward")
    def _raw_labels_forward_fake(features, labels, weights, num_classes, ignore_index, check_labels, deterministic):
        return _sums_fake(features, labels, weights, None, num_classes, ignore_index, check_labels, deterministic, "")

    @torch.library.register_fake("icl_kernels::_prototype_update_labels_backward")
    def _raw_labels_backward_fake(grad_sums, grad_totals, features, labels, weights, ignore_index, need_f, need_w):
        gf = torch.empty_like(features) if need_f else features.new_empty(0)
        gw = weights.new_empty(weights.shape) if need_w else grad_sums.new_empty(0)
        return gf, gw

    @torch.library.register_fake("icl_kernels::_prototype_update_probs_forward")
    def _raw_probs_forward_fake(features, probs, deterministic):
        return _sums_fake(features, None, None, probs, probs.shape[1], 0, False, deterministic, "")

    @torch.library.register_fake("icl_kernels::_prototype_update_probs_backward")
    def _raw_probs_backward_fake(grad_sums, grad_totals, features, probs, need_f, need_p):
        gf = torch.empty_like(features) if need_f else features.new_empty(0)
        gp = torch.empty_like(probs) if need_p else probs.new_empty(0)
        return gf, gp


# ---------------------------------------------------------------- checks


def _check_tensor(t, name: str, fn: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _check_common(fn: str, buffer, momentum, initialized, deterministic) -> float:
    _check_tensor(buffer, "buffer", fn)
    if buffer.dim() != 2:
        raise ValueError(f"{fn}: buffer must be [K, C], got shape {tuple(buffer.shape)}")
    if not buffer.dtype.is_floating_point:
        raise ValueError(f"{fn}: buffer must be a floating tensor, got {buffer.dtype}")
    if buffer.shape[0] < 1:
        raise ValueError(f"{fn}: buffer must hold at least one class (K >= 1), got shape {tuple(buffer.shape)}")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise ValueError(f"{fn}: momentum must be a number in [0, 1], got {momentum!r}")
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{fn}: momentum must be in [0, 1], got {momentum}")
    if initialized is not None:
        _check_tensor(initialized, "initialized", fn)
        if initialized.dtype != torch.bool or tuple(initialized.shape) != (buffer.shape[0],):
            raise ValueError(
                f"{fn}: initialized must be a bool tensor [K] = [{buffer.shape[0]}], got "
                f"{initialized.dtype} of shape {tuple(initialized.shape)}"
            )
        if initialized.device != buffer.device:
            raise ValueError(f"{fn}: initialized is on {initialized.device} but buffer is on {buffer.device}")
    if not isinstance(deterministic, bool):
        raise ValueError(f"{fn}: deterministic must be True or False, got {deterministic!r}")
    return momentum


def _check_same_device(t: Tensor, name: str, buffer: Tensor, fn: str) -> None:
    if t.device != buffer.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but buffer is on {buffer.device}; use one device")


# ---------------------------------------------------------------- reduction and blend


def _group_for(process_group):
    """(use_collectives, group): collectives run when a group is given or torch.distributed is initialised."""
    if process_group is not None:
        return True, process_group
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return True, None
    return False, None


def _global_sums(sums: Tensor, totals: Tensor, group, deterministic: bool) -> Tuple[Tensor, Tensor]:
    dist = torch.distributed
    world = dist.get_world_size(group)
    if world == 1:
        return sums, totals
    C = sums.shape[1]
    packed = torch.cat([sums.detach(), totals.detach().unsqueeze(1)], dim=1).contiguous()
    if deterministic:
        # Rank order, left to right, on every rank: bitwise the same result everywhere.
        parts = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(parts, packed, group=group)
        reduced = parts[0].clone()
        for part in parts[1:]:
            reduced.add_(part)
    else:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        reduced = packed
    # Value: the global sum exactly (x - x == 0 for finite x); gradient: straight to the local term.
    g_sums = reduced[:, :C] + (sums - sums.detach())
    g_totals = reduced[:, C] + (totals - totals.detach())
    return g_sums, g_totals


@torch.no_grad()
def _blend_(buffer: Tensor, means: Tensor, present: Tensor, momentum: float, initialized: Optional[Tensor]) -> None:
    work = torch.promote_types(buffer.dtype, means.dtype)
    m = means if means.dtype == work else means.to(work)
    blended = (buffer if buffer.dtype == work else buffer.to(work)) * momentum + m * (1.0 - momentum)
    if initialized is not None:
        blended = torch.where(initialized.unsqueeze(1), blended, m)  # first sighting: copy
        initialized.logical_or_(present)
    if blended.dtype != buffer.dtype:
        blended = blended.to(buffer.dtype)
    # Absent classes select their own row: bitwise unchanged.
    buffer.copy_(torch.where(present.unsqueeze(1), blended, buffer))


def _finish(buffer, means, totals, momentum, initialized, out_dtype):
    _blend_(buffer, means.detach(), totals > 0, momentum, initialized)
    return (means if means.dtype == out_dtype else means.to(out_dtype)), totals


_ROW_LABELS: dict = {}


def _row_labels(B: int, K: int, device: torch.device) -> Tensor:
    """int32 [B, K] with row k labelled k (the values form's labels); cached for eager calls."""
    key = (B, K, device)
    labels = _ROW_LABELS.get(key) if not torch.compiler.is_compiling() else None
    if labels is None:
        labels = torch.arange(K, device=device, dtype=torch.int32).unsqueeze(0).expand(B, K).contiguous()
        if not torch.compiler.is_compiling() and type(labels) is torch.Tensor:  # never keep a fake tensor
            _ROW_LABELS[key] = labels
    return labels


# ---------------------------------------------------------------- public functions


def prototype_update_(
    buffer: Tensor,
    values: Tensor,
    weights: Optional[Tensor] = None,
    *,
    momentum: float,
    initialized: Optional[Tensor] = None,
    process_group=None,
    deterministic: bool = True,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """Momentum update of class prototypes from per-sample class vectors (in place).

    Args:
        buffer: prototypes [K, C], updated in place without gradient.
        values: per-sample class vectors [B, K, C].
        weights: [B, K] weight of each vector (e.g. presence of class k in
            image b), or None for 1 everywhere.  A weight of 0 drops the vector
            entirely (non-finite values there do not propagate).
        momentum: in [0, 1]; buffer[k] <- momentum * buffer[k] + (1 - momentum) * means[k].
        initialized: optional bool [K]; a class not yet initialised copies its
            mean instead of blending, and its flag is set (in place).
        process_group: all-reduce sums and totals over this group; default:
            the world group when torch.distributed is initialised.
        deterministic: fixed-order reductions, no float atomics: the same
            inputs give a bitwise identical buffer on one device (and on every
            rank).  False lets the GPU backends atomicAdd their per-block
            partial sums into the output: that saves writing and re-reading
            the [blocks, K, C] partial buffer and one kernel launch (a few
            percent of a pass over the features at K*C = 1024), at the price of
            run-to-run differences in the last bits; the data-parallel
            reduction then uses one all_reduce instead of an all_gather.  The
            CPU kernels are always deterministic (no cost).
        backend: ``auto`` | ``triton`` | ``cuda`` | ``cpu`` | ``torch``; default
            from ``ICL_KERNELS_BACKEND``, else ``auto``.

    Returns:
        ``(means, totals)``: means [K, C] in values' dtype, the weighted mean
        over the batch (all ranks), differentiable w.r.t. values and weights
        (0 with zero gradient for classes whose total is <= 0); totals [K]
        (float32, float64 for float64 values), the global total weights.

    Example:
        >>> import torch, icl_kernels
        >>> buf = torch.zeros(4, 8)
        >>> means, totals = icl_kernels.prototype_update_(buf, torch.ones(2, 4, 8), momentum=0.9)
        >>> float(buf[0, 0]), float(totals[0])
        (0.1, 2.0)
    """
    fn = "prototype_update_"
    momentum = _check_common(fn, buffer, momentum, initialized, deterministic)
    K, C = buffer.shape
    _check_tensor(values, "values", fn)
    if not values.dtype.is_floating_point:
        raise ValueError(f"{fn}: values must be a floating tensor, got {values.dtype}")
    if values.dim() != 3 or values.shape[1] != K or values.shape[2] != C:
        raise ValueError(f"{fn}: values must be [B, K, C] = [B, {K}, {C}] (buffer is [K, C]), got {tuple(values.shape)}")
    _check_same_device(values, "values", buffer, fn)
    B = values.shape[0]
    acc = accumulation_dtype(values.dtype)
    if weights is not None:
        _check_tensor(weights, "weights", fn)
        if not weights.dtype.is_floating_point:
            raise ValueError(f"{fn}: weights must be a floating tensor, got {weights.dtype}")
        if tuple(weights.shape) != (B, K):
            raise ValueError(f"{fn}: weights must be [B, K] = [{B}, {K}], got {tuple(weights.shape)}")
        _check_same_device(weights, "weights", buffer, fn)
        weights = weights.to(acc).contiguous()
    name = backends.requested_name(backend)
    # The values form is the labels form over K "tokens" per sample, token k labelled k.
    features = values.transpose(1, 2)
    labels = _row_labels(B, K, values.device)
    means, totals = _class_means(features, labels, weights, None, K, _VALUES_IGNORE_INDEX, False, deterministic, name,
                                 process_group)
    return _finish(buffer, means, totals, momentum, initialized, values.dtype)


def masked_prototype_update_(
    buffer: Tensor,
    features: Tensor,
    *,
    labels: Optional[Tensor] = None,
    probs: Optional[Tensor] = None,
    momentum: float,
    ignore_index: int = -100,
    initialized: Optional[Tensor] = None,
    process_group=None,
    deterministic: bool = True,
    check_labels: bool = True,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """Momentum update of class prototypes from a feature map and a label map (in place).

    One fused pass over ``features`` computes per-class sums and totals (no
    one-hot [B, K, N] tensor); see :func:`prototype_update_` for the update rule.

    Args:
        buffer: prototypes [K, C], updated in place without gradient.
        features: [B, C, *spatial] with one or more spatial dims, any strides.
        labels: integer [B, *spatial], values in [0, K) or ``ignore_index``.
        probs: soft weights [B, K, *spatial] (exactly one of labels / probs);
            features and probs are read in their common dtype.
        momentum: in [0, 1].
        ignore_index: label value that is skipped.
        initialized: optional bool [K] (first update of a class copies).
        process_group, deterministic, backend: as in :func:`prototype_update_`.
        check_labels: on GPU, verify that every label is in [0, K) or
            ``ignore_index`` (one device-to-host sync per call); unchecked,
            such labels are skipped.  On CPU labels are always checked (free).

    Returns:
        ``(means, totals)``: means [K, C] in features' dtype, differentiable
        w.r.t. features and probs; totals [K] (float32, float64 for float64
        features): voxel counts (labels) or summed probabilities.

    Example:
        >>> import torch, icl_kernels
        >>> buf = torch.zeros(3, 16)
        >>> feats, labels = torch.randn(2, 16, 32, 32), torch.randint(0, 3, (2, 32, 32))
        >>> means, totals = icl_kernels.masked_prototype_update_(buf, feats, labels=labels, momentum=0.0)
        >>> torch.allclose(buf[1], feats.permute(0, 2, 3, 1)[labels == 1].mean(0), atol=1e-5)
        True
    """
    fn = "masked_prototype_update_"
    momentum = _check_common(fn, buffer, momentum, initialized, deterministic)
    K, C = buffer.shape
    _check_tensor(features, "features", fn)
    if not features.dtype.is_floating_point:
        raise ValueError(f"{fn}: features must be a floating tensor, got {features.dtype}")
    if features.dim() < 3:
        raise ValueError(f"{fn}: features must be [B, C, *spatial] with at least one spatial dim, got {tuple(features.shape)}")
    if features.shape[1] != C:
        raise ValueError(f"{fn}: features has C={features.shape[1]} channels but buffer is [K, C] = [{K}, {C}]")
    _check_same_device(features, "features", buffer, fn)
    if (labels is None) == (probs is None):
        raise ValueError(f"{fn}: give exactly one of labels (integer [B, *spatial]) and probs (floating [B, K, *spatial])")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"{fn}: ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(check_labels, bool):
        raise ValueError(f"{fn}: check_labels must be True or False, got {check_labels!r}")
    B, spatial = features.shape[0], tuple(features.shape[2:])
    name = backends.requested_name(backend)
    f = features.flatten(2)
    if labels is not None:
        _check_tensor(labels, "labels", fn)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"{fn}: labels must be an integer tensor, got {labels.dtype}")
        if tuple(labels.shape) != (B,) + spatial:
            raise ValueError(f"{fn}: labels must be [B, *spatial] = {[B, *spatial]}, got {list(labels.shape)}")
        _check_same_device(labels, "labels", buffer, fn)
        lab = labels.flatten(1)
        if lab.dtype not in (torch.int32, torch.int64):
            lab = lab.to(torch.int32)  # uint8 / int8 / int16 maps: the kernels read int32 or int64
        means, totals = _class_means(f, lab, None, None, K, int(ignore_index), check_labels, deterministic, name,
                                     process_group)
    else:
        _check_tensor(probs, "probs", fn)
        if not probs.dtype.is_floating_point:
            raise ValueError(f"{fn}: probs must be a floating tensor, got {probs.dtype}")
        if tuple(probs.shape) != (B, K) + spatial:
            raise ValueError(f"{fn}: probs must be [B, K, *spatial] = {[B, K, *spatial]}, got {list(probs.shape)}")
        _check_same_device(probs, "probs", buffer, fn)
        common = torch.promote_types(features.dtype, probs.dtype)
        p = probs.flatten(2).to(common)
        means, totals = _class_means(f.to(common), None, None, p, K, int(ignore_index), False, deterministic, name,
                                     process_group)
    return _finish(buffer, means, totals, momentum, initialized, features.dtype)
