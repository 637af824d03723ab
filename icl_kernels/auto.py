"""What ``backend="auto"`` runs, by rules measured on real machines.

The rules are functions of the shape only (no timing at run time, so a run is
reproducible and the backward always meets its forward's choice).

CPU (measured with ``python -m benches.proxy_attention --crossover``, three
runs of 49 shapes on 2 cores, benches/results/cpu/proxy_attention_crossover.csv;
benches/results/cpu/summary.md, "auto on CPU"):

1. ``ProxyAttention`` (the module) runs its *unfused* formulation (project the
   N tokens to keys and values with BLAS, as the published module does) when
   ``N * r <= 800``, or ``r <= 1.5`` and ``N * r <= 2000``, with
   ``r = C / M + 1 / H`` the flop ratio of the two formulations
   (:func:`cpu_prefers_unfused`). So: unfused where it costs about as many
   flops as the absorbed form and the tokens are few (3D levels: N up to
   ~1800), or where the tokens are very few whatever the ratio (2D: N up to
   ~180), i.e. where fixed costs and BLAS throughput outweigh the fused
   kernel's saving in memory traffic.
2. The op ``proxy_attention`` (absorbed form, any caller) runs the ``cpu``
   kernel for float32/float64 (``torch`` otherwise): the ``torch`` backend was
   never more than 20% faster on any swept shape, less than the run-to-run
   spread of these measurements, and up to 5.6x slower.

CUDA: the CUDA kernels first, Triton for C > 512 (the CUDA kernels' widest
tile) or where CUDA cannot run. That is the order of maturity, not a measured
speed rule yet: no GPU has timed the two against each other. The GPU check
(``benches/gpu_check.sh``) writes the table a measured rule will come from.
"""
from __future__ import annotations

from typing import Optional, Tuple

# Flop ratio unfused / absorbed of one attention (forward and backward alike):
#   unfused  ~ 2 N C^2 (token projections to keys and values) + 2 M N C / H (per-head products)
#   absorbed ~ 2 M N C (S = A xhat^T and Z = P xhat over full-width rows)
# so unfused / absorbed = C / M + 1 / H, with M = H * K query rows.
# Unfused where N times that ratio is at most UNFUSED_MAX_WORK, or, where the
# two cost about the same flops (ratio <= EVEN_RATIO), up to EVEN_MAX_WORK.
# Measured (the sweep steps N by about 3x): with a ratio of 4 to 5.5 (2D levels)
# the unfused form wins up to N * ratio ~ 800 and loses from ~900; with a ratio
# of 1.06 to 1.25 (3D levels) it wins up to ~700, ties at ~2000 (+-10%, the
# run-to-run spread) and loses from ~4500. At a tie the rule takes the unfused
# form: it is the published computation, so `auto` is then never slower than it.
UNFUSED_MAX_WORK = 800.0
EVEN_RATIO = 1.5
EVEN_MAX_WORK = 2000.0

CUDA_MAX_CHANNELS = 512  # widest tokens the CUDA kernels take (their register tiles)


def unfused_flop_ratio(channels: int, heads: int, rows: int) -> float:
    """C / M + 1 / H: flops of the unfused formulation over the absorbed one."""
    return channels / rows + 1.0 / heads


def cpu_prefers_unfused(tokens: int, channels: int, heads: int, rows: int) -> bool:
    """True when the module should run its unfused formulation on CPU under `auto`.

    tokens N, channels C, heads H, rows M = H * K (K queries)."""
    ratio = unfused_flop_ratio(channels, heads, rows)
    work = tokens * ratio
    return work <= UNFUSED_MAX_WORK or (ratio <= EVEN_RATIO and work <= EVEN_MAX_WORK)


# `auto`'s preference per device type for ops without a shape rule: the first
# backend that can run wins.
DEVICE_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}
_CUDA_WIDE_ORDER = ("triton", "torch")  # tokens wider than the CUDA kernels' tiles
_OTHER_ORDER = ("torch",)


def op_order(device_type: str, channels: Optional[int] = None) -> Tuple[str, ...]:
    """The preference order of `auto` on this device type: every op, and the proxy
    attention op by the token width ``channels`` (on CUDA, no CUDA kernel past
    CUDA_MAX_CHANNELS; on CPU the cpu kernel at every measured shape, then torch
    for dtypes the kernel does not take: see the module docstring). The one place
    that decides the order; :func:`icl_kernels.backends.resolve` walks it."""
    if device_type == "cuda" and channels is not None and channels > CUDA_MAX_CHANNELS:
        return _CUDA_WIDE_ORDER
    return DEVICE_ORDER.get(device_type, _OTHER_ORDER)
