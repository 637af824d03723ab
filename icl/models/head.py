"""The ICL head (SSPA and USCL are two instances of it).

Per level l (feature map [B, C_l, *spatial_l], N_l = prod(spatial_l) tokens):

1. tokenise: 1x1 conv, flatten to [B, N, C] (``faithful=True`` keeps the
   published tokeniser LayerNorm here as ``norm_layers[l]``);
2. class decoder: ``ProxyAttention(token_norm=True)`` cross-attends the K class
   queries over the tokens (the block's token LayerNorm is fused into the op),
   giving updated queries [B, K, C] and logits [B, K, H, N]; residual query MLP;
   spatial mixer on the logits (``mlp``: the published LayerNorm(N)-Linear-GELU-
   Linear over tokens; ``conv``: resolution-free depthwise convs);
3. depthwise-separable conv + 1x1 conv: [B*K, H, *spatial] -> [B, K, *spatial];
4. 1x1 Conv1d mapping the updated queries to the next level's width.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

import icl_kernels

__all__ = ["ICLHead", "ClassDecoder", "ConvMixer", "DropPath"]

QueryArg = Union[None, Tensor, Sequence[Tensor]]


def _conv(spatial_dims: int):
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def _bn(spatial_dims: int):
    return nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d


class DropPath(nn.Module):
    """Per-sample stochastic depth on dim 0: x * Bernoulli(1-p) / (1-p); identity in eval."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"DropPath: p must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _MLP(nn.Module):
    """Linear-GELU-Linear (published ``MLP``; submodule names fc1/fc2)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvMixer(nn.Module):
    """Resolution-free spatial mixer of the logit maps (the ``mixer="conv"`` option).

    On [B*K, H, *spatial]: GroupNorm(H, H) (each head's map normalised over space,
    per-head affine: the per-map analogue of the published LayerNorm over N),
    depthwise 3^d conv, GELU, depthwise 3^d conv with dilation 2 (receptive
    field 7). Returns the residual branch only; about 22*H parameters in 2D.
    """

    def __init__(self, heads: int, spatial_dims: int = 2) -> None:
        super().__init__()
        Conv = _conv(spatial_dims)
        self.norm = nn.GroupNorm(heads, heads)
        self.dw1 = Conv(heads, heads, 3, padding=1, groups=heads)
        self.act = nn.GELU()
        self.dw2 = Conv(heads, heads, 3, padding=2, dilation=2, groups=heads)

    def forward(self, x: Tensor) -> Tensor:
        return self.dw2(self.act(self.dw1(self.norm(x))))


class _SeparableConv(nn.Module):
    """Depthwise conv-BN-ReLU-pointwise conv-BN-ReLU (published ``SeparableConv2d/3d``,
    ``relu_first=False``; names under ``block``)."""

    def __init__(self, channels: int, spatial_dims: int) -> None:
        super().__init__()
        Conv, BN = _conv(spatial_dims), _bn(spatial_dims)
        self.block = nn.Sequential(
            OrderedDict(
                [
                    ("depthwise", Conv(channels, channels, 3, padding=1, groups=channels, bias=False)),
                    ("bn_depth", BN(channels)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("pointwise", Conv(channels, channels, 1, bias=False)),
                    ("bn_point", BN(channels)),
                    ("relu2", nn.ReLU(inplace=True)),
                ]
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


def mlp_mixer_params(num_tokens: int) -> int:
    """Parameters of one published spatial MLP mixer (LayerNorm(N) + two Linear(N, N))."""
    return 2 * num_tokens + 2 * (num_tokens * num_tokens + num_tokens)


class ClassDecoder(nn.Module):
    """One class-decoder block.

    ``forward(q [B, K, C], tokens [B, N, C], spatial) -> (q' [B, K, C], logits [B, K, H, N])``.

    Published computation (``faithful=True``): out, S = attn(LN_q(q), LN(tokens));
    out = out + dp(out); q' = out + dp(MLP(LN2(out))); S = S + dp(S);
    S = S + dp(Mixer(LN3(S))). ``faithful=False`` drops the two self-additions
    (which double queries and logits in eval) and uses the standard head split.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_tokens: Optional[int],
        mixer: str = "mlp",
        faithful: bool = False,
        drop_path: float = 0.02,
        mlp_ratio: float = 4.0,
        backend: Optional[str] = None,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        self.faithful = bool(faithful)
        self.mixer_kind = mixer
        self.num_tokens = num_tokens
        self.norm1_query = nn.LayerNorm(dim)
        # token_norm=True: the block's token LayerNorm (published ``norm1``) is
        # ``attn.norm_x``, applied inside the fused op.
        self.attn = icl_kernels.ProxyAttention(
            dim, num_heads, qkv_bias=True, official_layout=self.faithful, token_norm=True, backend=backend
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _MLP(dim, int(dim * mlp_ratio))
        if mixer == "mlp":
            if num_tokens is None:
                raise ValueError("ClassDecoder: mixer='mlp' needs num_tokens")
            self.norm3 = nn.LayerNorm(num_tokens)
            self.mlp2 = _MLP(num_tokens, num_tokens)
        elif mixer == "conv":
            self.mixer = ConvMixer(num_heads, spatial_dims)
        else:
            raise ValueError(f"ClassDecoder: mixer must be 'mlp' or 'conv', got {mixer!r}")

    def forward(self, q: Tensor, tokens: Tensor, spatial: Sequence[int]) -> Tuple[Tensor, Tensor]:
        out, logits = self.attn(self.norm1_query(q), tokens)
        if self.faithful:
            out = out + self.drop_path(out)
            logits = logits + self.drop_path(logits)
        q = out + self.drop_path(self.mlp(self.norm2(out)))
        if self.mixer_kind == "mlp":
            mixed = self.mlp2(self.norm3(logits))
        else:
            B, K, H, N = logits.shape
            mixed = self.mixer(logits.reshape(B * K, H, *spatial)).reshape(B, K, H, N)
        logits = logits + self.drop_path(mixed)
        return q, logits


#: token mixers of the class decoders: depthwise-separable convolution, or the published Linear(N, N)
MIXERS = ("conv", "mlp")


class ICLHead(nn.Module):
    """Semantic-proxy head on a list of multi-scale feature maps (SSPA or USCL).

    Args:
        in_channels: C_l per level (coarse to fine).
        num_classes: K.
        num_heads: attention heads per level (divisors of C_l).
        feature_sizes: spatial size per level (needed by ``mixer="mlp"``).
        mixer: ``"mlp"`` (published, ties the head to ``feature_sizes``) or
            ``"conv"`` (resolution-free, light).
        faithful: reproduce the published quirks: the tokeniser LayerNorm before
            the block's (two LayerNorms in a row), the ``q + drop_path(q)`` /
            ``attn + drop_path(attn)`` doubling, the plain-reshape head split and
            zero-initialised queries.
        drop_path: stochastic depth rate (published 0.02).
        mlp_ratio: hidden width of the query MLP.
        max_mixer_params: refuse ``mixer="mlp"`` when its total parameters
            exceed this (None: no limit).
        backend: ``icl_kernels`` backend of the fused attention.
        spatial_dims: 2 or 3.
        learned_queries: own the learned initial queries ``guided_Q`` [1, K, C_0].
        chain_queries: own the Conv1d query maps between levels (needed unless
            queries are always given per level).

    ``forward(feats, queries=None) -> (maps, updated)``: ``feats`` list of
    [B, C_l, *spatial_l]; ``queries`` None (learned ``guided_Q``), one
    [B or 1, K, C_0] tensor (first level; later levels chain through the query
    convs), or a list of [B or 1, K, C_l] used at each level (published USCL).
    ``maps[l]`` is [B, K, *spatial_l], ``updated[l]`` [B, K, C_l] (the block's
    output queries at level l).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        num_heads: Sequence[int],
        feature_sizes: Optional[Sequence[Sequence[int]]] = None,
        mixer: str = "mlp",
        faithful: bool = False,
        drop_path: float = 0.02,
        mlp_ratio: float = 4.0,
        max_mixer_params: Optional[int] = 50_000_000,
        backend: Optional[str] = None,
        spatial_dims: int = 2,
        learned_queries: bool = True,
        chain_queries: bool = True,
    ) -> None:
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        num_heads = [int(h) for h in num_heads]
        L = len(in_channels)
        if L == 0 or len(num_heads) != L:
            raise ValueError(f"ICLHead: in_channels ({in_channels}) and num_heads ({num_heads}) must be non-empty and of equal length")
        Conv = _conv(spatial_dims)
        if mixer not in MIXERS:
            raise ValueError(f"ICLHead: mixer must be 'mlp' or 'conv', got {mixer!r}")
        sizes: Optional[List[Tuple[int, ...]]] = None
        if feature_sizes is not None:
            if len(feature_sizes) != L:
                raise ValueError(f"ICLHead: feature_sizes needs {L} entries, got {len(feature_sizes)}")
            sizes = []
            for s in feature_sizes:
                s = (int(s),) * spatial_dims if isinstance(s, int) else tuple(int(v) for v in s)
                if len(s) != spatial_dims:
                    raise ValueError(f"ICLHead: feature size {s} does not have {spatial_dims} dimensions")
                sizes.append(s)
        if mixer == "mlp":
            if sizes is None:
                raise ValueError("ICLHead: mixer='mlp' needs feature_sizes (its Linear(N, N) fixes the token count)")
            need = sum(mlp_mixer_params(math.prod(s)) for s in sizes)
            if max_mixer_params is not None and need > max_mixer_params:
                raise ValueError(
                    f"ICLHead: mixer='mlp' for feature sizes {sizes} needs {need:,} parameters in its spatial "
                    f"MLPs, above max_mixer_params={max_mixer_params:,}; use mixer='conv' (resolution-free, "
                    f"a few hundred parameters) or raise max_mixer_params"
                )
        self.in_channels = tuple(in_channels)
        self.num_classes = int(num_classes)
        self.num_heads = tuple(num_heads)
        self.feature_sizes = None if sizes is None else tuple(sizes)
        self.mixer = mixer
        self.faithful = bool(faithful)
        self.spatial_dims = spatial_dims

        self.proj_layers = nn.ModuleList(Conv(c, c, 1) for c in in_channels)
        # faithful: the published tokeniser LayerNorm, applied before the block's own
        # (fused) one; otherwise a single LayerNorm, the fused one.
        self.norm_layers = nn.ModuleList(nn.LayerNorm(c) for c in in_channels) if self.faithful else None
        self.class_decoders = nn.ModuleList(
            ClassDecoder(
                in_channels[l],
                num_heads[l],
                None if sizes is None else math.prod(sizes[l]),
                mixer=mixer,
                faithful=faithful,
                drop_path=drop_path,
                mlp_ratio=mlp_ratio,
                backend=backend,
                spatial_dims=spatial_dims,
            )
            for l in range(L)
        )
        self.attn_convs0 = nn.ModuleList(_SeparableConv(h, spatial_dims) for h in num_heads)
        self.attn_convs1 = nn.ModuleList(Conv(h, 1, 1) for h in num_heads)
        self.query_convs = (
            nn.ModuleList(nn.Conv1d(in_channels[l], in_channels[l + 1], 1) for l in range(L - 1)) if chain_queries else None
        )
        if learned_queries:
            self.guided_Q = nn.Parameter(torch.zeros(1, num_classes, in_channels[0]))
            if not self.faithful:  # zero queries are identical for every class; break the tie
                nn.init.trunc_normal_(self.guided_Q, std=0.02)
        else:
            self.register_parameter("guided_Q", None)

    @property
    def num_levels(self) -> int:
        return len(self.in_channels)

    def read_raw_tokens(self) -> None:
        """Give each map's tokens to the class decoders unchanged: no 1x1 conv, no tokeniser
        LayerNorm (the published Swin-Unet heads; their parameters exist there but are unused)."""
        self.proj_layers = nn.ModuleList(nn.Identity() for _ in self.in_channels)
        self.norm_layers = None

    def _check_feats(self, feats: Sequence[Tensor]) -> None:
        if len(feats) != self.num_levels:
            raise ValueError(f"ICLHead: expected {self.num_levels} feature maps, got {len(feats)}")
        for l, f in enumerate(feats):
            if f.dim() != 2 + self.spatial_dims or f.shape[1] != self.in_channels[l]:
                raise ValueError(
                    f"ICLHead level {l}: expected a [B, {self.in_channels[l]}, {self.spatial_dims} spatial dims] map, "
                    f"got shape {tuple(f.shape)}"
                )
            if self.mixer == "mlp" and tuple(f.shape[2:]) != self.feature_sizes[l]:
                raise ValueError(
                    f"ICLHead level {l}: mixer='mlp' was built for feature size {self.feature_sizes[l]} "
                    f"but got {tuple(f.shape[2:])}; build with the matching feature_sizes or use mixer='conv'"
                )

    def _query(self, q: Tensor, B: int, level: int) -> Tensor:
        C = self.in_channels[level]
        if q.dim() != 3 or q.shape[1] != self.num_classes or q.shape[2] != C or q.shape[0] not in (1, B):
            raise ValueError(
                f"ICLHead level {level}: queries must be [{B} or 1, {self.num_classes}, {C}], got {tuple(q.shape)}"
            )
        return q.expand(B, -1, -1)

    def forward(self, feats: Sequence[Tensor], queries: QueryArg = None) -> Tuple[List[Tensor], List[Tensor]]:
        self._check_feats(feats)
        B = feats[0].shape[0]
        per_level = isinstance(queries, (list, tuple))
        if per_level:
            if len(queries) != self.num_levels:
                raise ValueError(f"ICLHead: got {len(queries)} per-level queries for {self.num_levels} levels")
        else:
            if self.query_convs is None and self.num_levels > 1:
                raise ValueError("ICLHead(chain_queries=False) needs one query tensor per level")
            if queries is None:
                if self.guided_Q is None:
                    raise ValueError("ICLHead(learned_queries=False) needs queries")
                queries = self.guided_Q
            q = self._query(queries, B, 0)
        maps: List[Tensor] = []
        updated: List[Tensor] = []
        for l, f in enumerate(feats):
            if per_level:
                q = self._query(queries[l], B, l)
            spatial = tuple(f.shape[2:])
            tokens = self.proj_layers[l](f).flatten(2).transpose(1, 2)  # [B, N, C]
            if self.norm_layers is not None:
                tokens = self.norm_layers[l](tokens)
            q_out, logits = self.class_decoders[l](q, tokens, spatial)
            K, H = logits.shape[1], logits.shape[2]
            m = self.attn_convs0[l](logits.reshape(B * K, H, *spatial))
            maps.append(self.attn_convs1[l](m).reshape(B, K, *spatial))
            updated.append(q_out)
            if not per_level and l + 1 < self.num_levels:
                q = self.query_convs[l](q_out.transpose(1, 2)).transpose(1, 2)
        return maps, updated

    # -- published checkpoints ----------------------------------------------
    def published_key_map(self, published_keys: Sequence[str]) -> Dict[str, str]:
        """Map published ``InherentConsistent`` keys to this head's keys (faithful heads).

        The block's token LayerNorm ``class_decoders.l.norm1`` lives in
        ``class_decoders.l.attn.norm_x`` here; published keys this head has no
        parameter for (unused query convs, USCL's unused ``guided_Q``) are dropped.
        """
        own = set(self.state_dict().keys())
        out = {}
        for k in published_keys:
            parts = k.split(".")
            if len(parts) >= 4 and parts[0] == "class_decoders" and parts[2] == "norm1":
                new = ".".join(parts[:2] + ["attn", "norm_x"] + parts[3:])
            else:
                new = k
            if new in own:
                out[k] = new
        return out

    def load_published_state_dict(self, state: Dict[str, Tensor], strict: bool = True) -> None:
        """Load a published ``sspa``/``uscl`` state_dict (prefix stripped). Needs
        ``faithful=True`` and ``mixer="mlp"`` with the published feature sizes."""
        if not (self.faithful and self.mixer == "mlp"):
            raise ValueError("ICLHead.load_published_state_dict needs faithful=True and mixer='mlp'")
        mapping = self.published_key_map(list(state.keys()))
        self.load_state_dict({mapping[k]: v for k, v in state.items() if k in mapping}, strict=strict)
