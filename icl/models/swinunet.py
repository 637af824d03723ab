"""Swin-Unet (2D) as an ICL backbone: the network of the paper's ACDC transformer result.

The published ``SwinUnet`` wraps a ``SwinTransformerSys`` built from the
``swin_tiny_patch4_window7_224_lite`` config. What its code runs (not what the
config names): 224x224 input, patch 4, embedding width 96, encoder depths
(2, 2, 2, 2), heads (3, 6, 12, 24), window 7, MLP ratio 4, qkv bias, default
qk scale, no dropout, drop path 0.2, patch norm, no absolute position
embedding, "expand_first" x4 final upsampling; the decoder stages repeat the
encoder's depths and heads in reverse (the config's DECODER_DEPTHS never
reaches the constructor, and the class ignores its own ``depths_decoder``).
A one-channel image is repeated to three channels.

:class:`SwinUnet2D` keeps the published module names under ``swin_unet.`` so
its ``state_dict`` keys and shapes are the published ones (a published
``model_best.pth`` loads as it is). ICL reads the outputs of the three decoder
stages that hold Swin blocks (before their upsampling): 4E, 2E, E channels at
1/16, 1/8, 1/4 of the input (384, 192, 96 at 14^2, 28^2, 56^2 for the
published 224x224), heads of width 16 (24, 12, 6 published). The published
heads take these tokens as they are: no 1x1 conv, no tokeniser LayerNorm
(``faithful=True`` heads do the same here).

``pretrained=FILE`` starts from an ImageNet Swin-T checkpoint the published
way (:func:`load_swin_pretrained`): each encoder stage's weights also
initialise the decoder stage of the same width.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .common import default_heads

__all__ = ["SWINUNET_STRIDES", "SwinUnet2D", "SwinUnetBody", "PretrainedReport", "build_swinunet",
           "load_swin_pretrained", "swinunet_layout"]

log = logging.getLogger(__name__)

#: downsampling of the three maps ICL reads (decoder stages 1, 2, 3), coarse to fine
SWINUNET_STRIDES = (16, 8, 4)
#: the published lite configuration as its code executes it
DEFAULTS = dict(img_size=224, patch_size=4, embed_dim=96, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24),
                window_size=7, mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
                drop_path_rate=0.2, ape=False, patch_norm=True)
NUM_STAGES = 4  # the published decoder indexes its skips as 3 - i: four stages only


def _pair(v) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected one size or two, got {tuple(v)}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


class _DropPath(nn.Module):
    """Per-sample stochastic depth, x * (Bernoulli(keep) / keep) (timm's rounding); identity in eval."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def _windows(x: Tensor, ws: int) -> Tensor:
    """[B, H, W, C] -> [B * (H/ws) * (W/ws), ws*ws, C], windows in row-major order per image."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, C)


def _unwindows(w: Tensor, ws: int, H: int, W: int) -> Tensor:
    """Inverse of :func:`_windows`: -> [B, H, W, C]."""
    C = w.shape[-1]
    x = w.reshape(-1, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def _relative_index(ws: int) -> Tensor:
    """[ws^2, ws^2] index into the (2ws-1)^2 table of relative offsets (dy, dx), row-major."""
    ys, xs = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + (ws - 1)
    dx = xs[:, None] - xs[None, :] + (ws - 1)
    return dy * (2 * ws - 1) + dx


def _shift_mask(H: int, W: int, ws: int, shift: int) -> Tensor:
    """[nW, ws^2, ws^2]: 0 between tokens of the same region of the rolled grid, -100 across regions."""
    region = torch.zeros(1, H, W, 1)
    bounds = ((0, -ws), (-ws, -shift), (-shift, None))
    label = 0
    for h0, h1 in bounds:
        for w0, w1 in bounds:
            region[:, h0:h1, w0:w1, :] = label
            label += 1
    r = _windows(region, ws).squeeze(-1)  # [nW, ws^2]
    diff = r[:, None, :] - r[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


class _WindowAttention(nn.Module):
    """Multi-head self-attention inside each window with a learned relative-position bias."""

    def __init__(self, dim: int, ws: int, heads: int, qkv_bias: bool, qk_scale: Optional[float],
                 attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.heads = heads
        self.ws = ws
        # as published: a falsy qk_scale (None, or the config's False) means head_dim ** -0.5
        self.scale = qk_scale or (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        self.register_buffer("relative_position_index", _relative_index(ws))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        Bw, N, C = x.shape
        q, k, v = self.qkv(x).reshape(Bw, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q * self.scale) @ k.transpose(-2, -1)  # [Bw, heads, N, N]
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        scores = scores + bias.reshape(N, N, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            scores = (scores.reshape(Bw // nW, nW, self.heads, N, N) + mask[None, :, None]).reshape(Bw, self.heads, N, N)
        attn = self.attn_drop(scores.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(Bw, N, C)
        return self.proj_drop(self.proj(out))


class _SwinBlock(nn.Module):
    """(Shifted-)window attention and MLP, both pre-norm and residual, on [B, H*W, C] tokens."""

    def __init__(self, dim: int, grid: Tuple[int, int], heads: int, window: int, shift: int, cfg: Dict,
                 drop_path: float) -> None:
        super().__init__()
        self.grid = grid
        # as published: a grid no larger than the window is one window, unshifted
        if min(grid) <= window:
            window, shift = min(grid), 0
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _WindowAttention(dim, window, heads, cfg["qkv_bias"], cfg["qk_scale"], cfg["attn_drop_rate"],
                                     cfg["drop_rate"])
        self.drop_path = _DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * cfg["mlp_ratio"]), cfg["drop_rate"])
        # a buffer (in the state_dict, as published) only where the windows are shifted
        self.register_buffer("attn_mask", _shift_mask(grid[0], grid[1], window, shift) if shift > 0 else None)

    def forward(self, x: Tensor) -> Tensor:
        H, W = self.grid
        B, L, C = x.shape
        y = self.norm1(x).reshape(B, H, W, C)
        s = self.shift
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = self.attn(_windows(y, self.window), self.attn_mask)
        y = _unwindows(y, self.window, H, W)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + self.drop_path(y.reshape(B, L, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _PatchMerging(nn.Module):
    """2x2 neighbours concatenated (order (0,0), (1,0), (0,1), (1,1)), LayerNorm(4C), Linear 4C -> 2C."""

    def __init__(self, grid: Tuple[int, int], dim: int) -> None:
        super().__init__()
        self.grid = grid
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        H, W = self.grid
        B, _, C = x.shape
        x = x.reshape(B, H, W, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(B, -1, 4 * C)))


def _unfold_channels(x: Tensor, grid: Tuple[int, int], scale: int) -> Tensor:
    """[B, H*W, s*s*c] -> [B, (H*s)*(W*s), c]: channel blocks (p1, p2, c) become s x s pixels."""
    H, W = grid
    B, _, C = x.shape
    c = C // (scale * scale)
    x = x.reshape(B, H, W, scale, scale, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H * scale * W * scale, c)


class _PatchExpand(nn.Module):
    """Linear C -> 2C, then each token becomes 2x2 tokens of C/2, LayerNorm(C/2)."""

    def __init__(self, grid: Tuple[int, int], dim: int) -> None:
        super().__init__()
        self.grid = grid
        self.expand = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(_unfold_channels(self.expand(x), self.grid, 2))


class _FinalExpand4(nn.Module):
    """Linear C -> 16C, then each token becomes 4x4 tokens of C, LayerNorm(C)."""

    def __init__(self, grid: Tuple[int, int], dim: int) -> None:
        super().__init__()
        self.grid = grid
        self.expand = nn.Linear(dim, 16 * dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(_unfold_channels(self.expand(x), self.grid, 4))


class _Stage(nn.Module):
    """Swin blocks (every second one shifted) followed by an optional resampling (``downsample`` or
    ``upsample``, the published attribute names)."""

    def __init__(self, dim: int, grid: Tuple[int, int], depth: int, heads: int, cfg: Dict,
                 drop_paths: Sequence[float], resample: Optional[str]) -> None:
        super().__init__()
        ws = cfg["window_size"]
        self.blocks = nn.ModuleList(
            _SwinBlock(dim, grid, heads, ws, 0 if i % 2 == 0 else ws // 2, cfg, drop_paths[i]) for i in range(depth))
        self.resample_name = resample
        if resample == "downsample":
            self.downsample = _PatchMerging(grid, dim)
        elif resample == "upsample":
            self.upsample = _PatchExpand(grid, dim)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(output, the blocks' output before the resampling)."""
        for blk in self.blocks:
            x = blk(x)
        feat = x
        if self.resample_name is not None:
            x = getattr(self, self.resample_name)(x)
        return x, feat


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int, norm: bool) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        return x if self.norm is None else self.norm(x)


def _check_geometry(img: Tuple[int, int], cfg: Dict) -> None:
    """Refuse sizes the network cannot run, naming the option and the failing stage."""
    p, ws = cfg["patch_size"], cfg["window_size"]
    mult = p * 2 ** (NUM_STAGES - 1)
    if any(s <= 0 or s % mult for s in img):
        raise ValueError(f"swinunet: img_size {img} must be positive multiples of {mult} (token patch {p} "
                         f"x 2^{NUM_STAGES - 1} patch mergings)")
    if ws < 1:
        raise ValueError(f"swinunet: window_size must be a positive integer, got {ws}")
    for i in range(NUM_STAGES):
        g = (img[0] // p // 2 ** i, img[1] // p // 2 ** i)
        w = min(g) if min(g) <= ws else ws
        if g[0] % w or g[1] % w:
            grids = [(img[0] // p // 2 ** j, img[1] // p // 2 ** j) for j in range(NUM_STAGES)]
            raise ValueError(f"swinunet: window_size {ws} does not tile stage {i}'s {g[0]}x{g[1]} token grid "
                             f"(input {img[0]}x{img[1]}, token patch {p}); set model_options window_size to one "
                             f"that divides every grid {grids} (a window at least as large as a grid covers it "
                             f"whole), or use sizes that are multiples of {mult * ws}")


class SwinUnetBody(nn.Module):
    """The published ``SwinTransformerSys`` network (module names and parameters as published).

    ``forward(x [B, in_chans, H, W]) -> (logits [B, K, H, W], [decoder maps, coarse to fine])``.
    """

    def __init__(self, num_classes: int, in_chans: int = 3, **options: Any) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"swinunet: unknown option(s) {unknown}; expected some of {sorted(DEFAULTS)}")
        cfg = dict(DEFAULTS, **options)
        img = _pair(cfg["img_size"])
        depths = [int(d) for d in cfg["depths"]]
        heads = [int(h) for h in cfg["num_heads"]]
        E, p = int(cfg["embed_dim"]), int(cfg["patch_size"])
        cfg.update(window_size=int(cfg["window_size"]), patch_size=p)
        if len(depths) != NUM_STAGES or len(heads) != NUM_STAGES:
            raise ValueError(f"swinunet: depths and num_heads need {NUM_STAGES} entries each (the published "
                             f"decoder is wired for four stages), got depths {depths}, num_heads {heads}")
        if any(d < 1 for d in depths):
            raise ValueError(f"swinunet: every depth must be at least 1 (the decoder reads each stage's "
                             f"blocks), got {depths}")
        bad = [(E * 2 ** i, h) for i, h in enumerate(heads) if h < 1 or (E * 2 ** i) % h]
        if bad:
            raise ValueError(f"swinunet: num_heads must divide each stage's width; (width, heads) {bad} do not "
                             f"(embed_dim {E})")
        if not 0.0 <= float(cfg["drop_path_rate"]) < 1.0:
            raise ValueError(f"swinunet: drop_path_rate must be in [0, 1), got {cfg['drop_path_rate']}")
        _check_geometry(img, cfg)
        self.img_size, self.num_classes, self.embed_dim = img, int(num_classes), E
        self.patches_resolution = (img[0] // p, img[1] // p)
        self.ape = bool(cfg["ape"])

        self.patch_embed = _PatchEmbed(p, int(in_chans), E, bool(cfg["patch_norm"]))
        if self.ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.patches_resolution[0] * self.patches_resolution[1], E))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(cfg["drop_rate"])
        # stochastic depth grows linearly over the encoder blocks; decoder stage j reuses encoder stage j's rates
        rates = torch.linspace(0, float(cfg["drop_path_rate"]), sum(depths), device="cpu").tolist()
        stage_rates = [rates[sum(depths[:i]):sum(depths[:i + 1])] for i in range(NUM_STAGES)]

        def grid(i: int) -> Tuple[int, int]:
            return self.patches_resolution[0] // 2 ** i, self.patches_resolution[1] // 2 ** i

        last = NUM_STAGES - 1
        self.layers = nn.ModuleList(
            _Stage(E * 2 ** i, grid(i), depths[i], heads[i], cfg, stage_rates[i],
                   "downsample" if i < last else None) for i in range(NUM_STAGES))
        # decoder stage u works at encoder stage i = 3 - u; u = 0 is a bare upsampling
        self.layers_up = nn.ModuleList([_PatchExpand(grid(last), E * 2 ** last)])
        self.concat_back_dim = nn.ModuleList([nn.Identity()])
        for u in range(1, NUM_STAGES):
            i = last - u
            self.layers_up.append(_Stage(E * 2 ** i, grid(i), depths[i], heads[i], cfg, stage_rates[i],
                                         "upsample" if u < last else None))
            self.concat_back_dim.append(nn.Linear(2 * E * 2 ** i, E * 2 ** i))
        self.norm = nn.LayerNorm(E * 2 ** last)
        self.norm_up = nn.LayerNorm(E)
        self.up = _FinalExpand4(self.patches_resolution, E)
        self.output = nn.Conv2d(E, self.num_classes, kernel_size=1, bias=False)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tuple[Tensor, List[Tensor]]:
        B, _, H, W = x.shape
        if (H, W) != self.img_size:
            raise ValueError(f"swinunet was built for {self.img_size[0]}x{self.img_size[1]} inputs (img_size), "
                             f"got {H}x{W}; build it with img_size equal to the patch size")
        x = self.patch_embed(x)
        if self.ape:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        skips = []
        for layer in self.layers:
            skips.append(x)
            x, _ = layer(x)
        x = self.norm(x)
        x = self.layers_up[0](x)
        feats = []
        for u in range(1, NUM_STAGES):
            x = self.concat_back_dim[u](torch.cat([x, skips[NUM_STAGES - 1 - u]], dim=-1))
            x, feat = self.layers_up[u](x)
            g = self.layers_up[u].blocks[0].grid
            feats.append(feat.transpose(1, 2).reshape(B, -1, g[0], g[1]))
        x = self.up(self.norm_up(x))
        h, w = self.patches_resolution
        logits = self.output(x.reshape(B, 4 * h, 4 * w, self.embed_dim).permute(0, 3, 1, 2))
        return logits, feats


def _init_weights(m: nn.Module) -> None:
    """The published initialisation: truncated normal (std 0.02) Linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class SwinUnet2D(nn.Module):
    """The published ``SwinUnet`` backbone: :class:`SwinUnetBody` as ``swin_unet``, with one-channel
    images repeated to three channels.

    ``forward(x, return_features=False)`` -> logits [B, K, H, W], or (logits, [maps]) with maps
    [B, 4E, H/16, W/16], [B, 2E, H/8, W/8], [B, E, H/4, W/4] (the decoder stages' block outputs).
    """

    #: ICL heads built with faithful=True read these maps' tokens unchanged (as published)
    icl_raw_tokens = True

    def __init__(self, in_channels: int, num_classes: int, **options: Any) -> None:
        super().__init__()
        in_channels = int(in_channels)
        if in_channels < 1:
            raise ValueError(f"swinunet: in_channels must be at least 1, got {in_channels}")
        self.in_channels = in_channels
        # published: 3-channel patch embedding (ImageNet), a gray image repeated; other counts embed as they are
        self.repeat_to = 3 if in_channels == 1 else None
        self.swin_unet = SwinUnetBody(num_classes, in_chans=3 if in_channels == 1 else in_channels, **options)

    def forward(self, x: Tensor, return_features: bool = False):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"swinunet: expected a [B, {self.in_channels}, H, W] input, got {tuple(x.shape)}")
        if self.repeat_to:
            x = x.repeat(1, self.repeat_to, 1, 1)
        logits, feats = self.swin_unet(x)
        return (logits, feats) if return_features else logits


# -- pretrained weights -------------------------------------------------------------------------


@dataclass
class PretrainedReport:
    """What :func:`load_swin_pretrained` did (key lists of the network's ``swin_unet`` state)."""

    path: str
    source: str  # "imagenet" (a checkpoint with a 'model' entry) or "swinunet" (a Swin-Unet state)
    loaded: List[str] = field(default_factory=list)
    shape_skipped: List[str] = field(default_factory=list)  # name matched, shape did not: left as initialised
    unused: List[str] = field(default_factory=list)  # checkpoint (or mapped) keys the network has no slot for
    untouched: List[str] = field(default_factory=list)  # network keys the checkpoint did not provide

    def summary(self) -> str:
        return (f"{self.path}: loaded {len(self.loaded)} of the network's {len(self.loaded) + len(self.untouched)} "
                f"tensors ({self.source} checkpoint); {len(self.shape_skipped)} skipped for their shape, "
                f"{len(self.unused)} checkpoint entries unused")


def _read_checkpoint(path: str) -> Dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"swinunet pretrained: no such file {path!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (any failure to read is the file's problem)
        raise ValueError(f"swinunet pretrained: cannot read {path!r} as a PyTorch checkpoint of tensors "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"swinunet pretrained: {path!r} holds a {type(obj).__name__}, not a state dict")
    return obj


def _imagenet_to_swinunet(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Published mapping: every key kept, and each ``layers.N.*`` also copied to ``layers_up.(3-N).*``
    (the decoder stage of the same width)."""
    out = dict(state)
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] == "layers" and len(parts) > 2 and parts[1].isdigit():
            out[".".join(["layers_up", str(NUM_STAGES - 1 - int(parts[1]))] + parts[2:])] = v
    return out


def _strip_prefixes(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    # published: cuts 17 characters, i.e. 'module.swin_unet.' (a DataParallel SwinUnet); here each
    # prefix is removed only where present
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "swin_unet."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_swin_pretrained(body: nn.Module, path: str) -> PretrainedReport:
    """Initialise ``body`` (a :class:`SwinUnetBody`, or a :class:`SwinUnet2D`) from ``path``, as the
    published ``SwinUnet.load_from`` does.

    A checkpoint with a ``'model'`` entry (ImageNet Swin: ``swin_tiny_patch4_window7_224.pth``): its
    tensors, plus each encoder stage's ``layers.N.*`` copied to decoder stage ``layers_up.(3-N).*``;
    a tensor whose name the network has but whose shape differs is skipped (left as initialised);
    names the network lacks (the classifier ``head.*``, blocks beyond the network's depths, the
    bottleneck stage's copies) are ignored. Otherwise the file is taken as a Swin-Unet state
    (``module.``/``swin_unet.`` prefixes removed, the ``output`` classifier dropped). Raises when the
    file is missing or unreadable, or when no tensor fits.
    """
    if isinstance(body, SwinUnet2D):
        body = body.swin_unet
    raw = _read_checkpoint(path)
    if "model" in raw:
        source, state = "imagenet", raw["model"]
        if not isinstance(state, dict):
            raise ValueError(f"swinunet pretrained: {path!r}: its 'model' entry is a {type(state).__name__}, "
                             f"not a state dict")
        state = _imagenet_to_swinunet(state)
    else:
        source = "swinunet"
        state = {k: v for k, v in _strip_prefixes(raw).items() if "output" not in k}
    own = body.state_dict()
    report = PretrainedReport(path=os.fspath(path), source=source)
    take = {}
    for k, v in state.items():
        if k not in own or not isinstance(v, Tensor):
            report.unused.append(k)
        elif tuple(v.shape) != tuple(own[k].shape):
            report.shape_skipped.append(f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}")
        else:
            take[k] = v
    if not take:
        raise ValueError(
            f"swinunet pretrained: no tensor of {path!r} fits the network: 0 of {len(own)} loaded; "
            f"{len(report.shape_skipped)} name(s) matched with other shapes {report.shape_skipped[:3]}, "
            f"{len(report.unused)} name(s) unknown {report.unused[:3]} (expected Swin keys such as "
            f"'patch_embed.proj.weight', 'layers.0.blocks.0.attn.qkv.weight' under 'model')")
    report.loaded = sorted(take)
    report.untouched = [k for k in own if k not in take]
    result = body.load_state_dict(take, strict=False)
    assert not result.unexpected_keys  # only own keys were taken
    log.info("swinunet pretrained: %s", report.summary())
    return report


# -- the registry's view --------------------------------------------------------------------------


def swinunet_layout(options: Dict[str, Any]):
    """(channels, heads) of the maps ICL reads: (4E, 2E, E), heads of width 16 (published 24, 12, 6)."""
    E = int(options.get("embed_dim", DEFAULTS["embed_dim"]))
    channels = (4 * E, 2 * E, E)
    return channels, tuple(default_heads(c) for c in channels)


def build_swinunet(in_channels: int, num_classes: int, spatial_dims: int = 2,
                   patch: Optional[Sequence[int]] = None, **options: Any) -> SwinUnet2D:
    """The published Swin-Unet (lite config) for inputs of the training ``patch``.

    ``options``: img_size (default: the patch, else 224; must equal the patch; the token patch is
    fixed at 4, as the registry's strides are); embed_dim (96), depths ((2, 2, 2, 2)), num_heads ((3, 6, 12, 24)),
    window_size (7: must tile every stage's token grid), mlp_ratio, qkv_bias, qk_scale, drop_rate,
    attn_drop_rate, drop_path_rate (0.2), ape, patch_norm; pretrained (a file: ImageNet Swin-T
    weights mapped as published, see :func:`load_swin_pretrained`).
    """
    if int(spatial_dims) != 2:
        raise ValueError(f"build_backbone: swinunet is 2-D, got spatial_dims={spatial_dims}")
    opts = dict(options)
    pretrained = opts.pop("pretrained", None)
    if "patch_size" in opts:
        raise ValueError("build_backbone: swinunet option patch_size is not a setting (the token patch is 4); "
                         "give the training patch as --patch-size / img_size")
    if patch is not None:
        patch = tuple(int(p) for p in patch)
        if len(patch) != 2:
            raise ValueError(f"build_backbone: swinunet needs a 2-D patch size, got {patch}")
        if "img_size" in opts and _pair(opts["img_size"]) != patch:
            raise ValueError(f"build_backbone: swinunet img_size {opts['img_size']} must equal the patch size "
                             f"{patch} (the network is built for one input size); drop img_size or make them equal")
        opts["img_size"] = patch
    try:
        net = SwinUnet2D(in_channels, num_classes, **opts)
    except ValueError as exc:
        raise ValueError(f"build_backbone: {exc}") from exc
    if pretrained:
        load_swin_pretrained(net, pretrained)
    return net
