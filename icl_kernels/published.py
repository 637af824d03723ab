"""An independent transcription of the published ICL attention module.

``Query_Attention`` computes what ``Query_Attention`` in zhuye98/ICL
(``code/networks/unet_icl.py``) computes, with the same submodule names, so a
published state_dict loads into it.  It is the baseline of the benchmarks and
the oracle of the module parity tests; it is not fast.  ``standard_layout=True``
gives the same computation with the standard head split (transpose, not a
plain reshape).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn


class Query_Attention(nn.Module):  # noqa: N801  (the published class name, which apply_to matches)
    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        standard_layout: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.standard_layout = standard_layout
        self.fc_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.fc_kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, q: Tensor, x: Tensor) -> Tuple[Tensor, Tensor]:
        B, N, C = x.shape
        K = q.shape[1]
        H = self.num_heads
        d = C // H
        queries = self.fc_q(q)
        if self.standard_layout:
            queries = queries.view(B, K, H, d).transpose(1, 2)
        else:
            queries = queries.reshape(B, H, K, d)  # the published plain reshape
        keys_values = self.fc_kv(x).reshape(B, N, 2, H, d).permute(2, 0, 3, 1, 4)
        keys, values = keys_values[0], keys_values[1]             # [B, H, N, d]
        logits = torch.matmul(queries, keys.transpose(-2, -1)) * self.scale
        weights = self.attn_drop(logits.softmax(dim=-1))
        attended = torch.matmul(weights, values)                  # [B, H, K, d]
        if self.standard_layout:
            attended = attended.transpose(1, 2)
        out = self.proj_drop(self.proj(attended.reshape(B, K, C)))
        return out, logits.permute(0, 2, 1, 3)
