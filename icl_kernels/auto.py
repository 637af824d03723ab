"""What ``backend="auto"`` runs, by rules measured on real machines.

The rules are functions of the shape only (no timing at run time, so a run is
reproducible and the backward always meets its forward's choice).

CPU (measured with ``python -m benches.proxy_attention --crossover``; the sweep
and how the thresholds follow from it are in the README, section "auto on CPU",
and in benches/results/cpu/proxy_attention_crossover.csv):

1. ``ProxyAttention`` (the module) runs its *unfused* formulation (project the
   N tokens to keys and values with BLAS, as the published module does) when
   that costs few more flops than the absorbed one and N is small enough that
   the fused kernel's saving in memory traffic cannot pay for BLAS's higher
   throughput: :func:`cpu_prefers_unfused`.
2. The op ``proxy_attention`` (absorbed form, any caller) runs the ``cpu``
   kernel unless the ``torch`` backend measured faster for the shape:
   :func:`cpu_op_order`.

CUDA: the CUDA kernels first, Triton for C > 512 (the CUDA kernels' widest
tile) or where CUDA cannot run. That is the order of maturity, not a measured
speed rule yet: no GPU has timed the two against each other. The GPU check
(``benches/gpu_check.sh``) writes the table a measured rule will come from.
"""
from __future__ import annotations

from typing import List, Optional

# Flop ratio unfused / absorbed of one attention (forward and backward alike):
#   unfused  ~ 2 N C^2 (token projections to keys and values) + 2 M N C / H (per-head products)
#   absorbed ~ 2 M N C (S = A xhat^T and Z = P xhat over full-width rows)
# so unfused / absorbed = C / M + 1 / H, with M = H * K query rows.
UNFUSED_MAX_FLOP_RATIO = 1.5
# ... and only while the tokens are few: past this N the fused kernel, which
# never writes keys, values or probabilities, wins even at equal flops.
UNFUSED_MAX_TOKENS = 4096
# The op: the `torch` backend (BLAS batched products) beats the `cpu` kernel
# when each batch element has at least this many query rows over few tokens.
TORCH_MIN_ROWS = 128
TORCH_MAX_TOKENS = 4096

CUDA_MAX_CHANNELS = 512  # widest tokens the CUDA kernels take (their register tiles)


def unfused_flop_ratio(channels: int, heads: int, rows: int) -> float:
    """C / M + 1 / H: flops of the unfused formulation over the absorbed one."""
    return channels / rows + 1.0 / heads


def cpu_prefers_unfused(tokens: int, channels: int, heads: int, rows: int) -> bool:
    """True when the module should run its unfused formulation on CPU under `auto`.

    tokens N, channels C, heads H, rows M = H * K (K queries)."""
    return (unfused_flop_ratio(channels, heads, rows) <= UNFUSED_MAX_FLOP_RATIO
            and tokens <= UNFUSED_MAX_TOKENS)


def cpu_op_order(tokens: int, channels: int, rows: int) -> List[str]:
    """`auto`'s backend preference for the op on CPU tensors of this shape."""
    if rows >= TORCH_MIN_ROWS and tokens <= TORCH_MAX_TOKENS:
        return ["torch", "cpu"]
    return ["cpu", "torch"]


def cuda_op_order(channels: int) -> List[str]:
    """`auto`'s backend preference for the op on CUDA tensors."""
    order = ["cuda", "triton", "torch"]
    if channels > CUDA_MAX_CHANNELS:
        order.remove("cuda")
    return order


def op_order(device_type: str, tokens: int, channels: int, rows: int) -> Optional[List[str]]:
    """The preference order of `auto` for the op (None: the registry's default for the device)."""
    if device_type == "cuda":
        return cuda_op_order(channels)
    if device_type == "cpu":
        return cpu_op_order(tokens, channels, rows)
    return None
