"""The published ICL backbones: a 2D UNet (PyMIC/SSL4MIS lineage) and a 3D UNet
(Attention-Gated-Networks/SSL4MIS lineage).

Module names follow the published code so that a published checkpoint (the
``model_best.pth`` the ICL scripts export: every key without ``sspa``/``uscl``)
loads with ``load_state_dict`` unchanged.

Both accept ``forward(x, return_features=None)``: logits, or ``(logits, feats)``
with ``feats`` the three decoder outputs ICL attaches to, coarse to fine.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNet2D", "UNet3D"]

Output = Union[Tensor, Tuple[Tensor, List[Tensor]]]


def _check_divisible(x: Tensor, factor: int, name: str) -> None:
    bad = [s for s in x.shape[2:] if s % factor]
    if bad:
        raise ValueError(
            f"{name}: every spatial size must be divisible by {factor} (the network's downsampling), "
            f"got input shape {tuple(x.shape)}"
        )


# --------------------------------------------------------------------- 2D UNet
class _ConvBlock2d(nn.Module):
    """conv3x3-BN-LeakyReLU-Dropout-conv3x3-BN-LeakyReLU (published ``ConvBlock``)."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float) -> None:
        super().__init__()
        self.conv_conv = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.LeakyReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_conv(x)


class _DownBlock2d(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), _ConvBlock2d(in_ch, out_ch, dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.maxpool_conv(x)


class _UpBlock2d(nn.Module):
    """1x1 conv to the skip's width, bilinear x2 (``align_corners=True``), concat
    [skip, up], ConvBlock.

    This is what the published ``UpBlock`` executes: its ``Decoder`` never passes
    ``bilinear``, so the default ``bilinear=True`` branch runs (the
    ``params['bilinear'] = False`` entry is never read).
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1x1 = nn.Conv2d(in_ch, skip_ch, kernel_size=1)
        self.conv = _ConvBlock2d(2 * skip_ch, out_ch, 0.0)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        up = F.interpolate(self.conv1x1(x), scale_factor=2, mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, up], dim=1))


class _Encoder2d(nn.Module):
    def __init__(self, in_channels: int, ch: Sequence[int], dropout: Sequence[float]) -> None:
        super().__init__()
        self.in_conv = _ConvBlock2d(in_channels, ch[0], dropout[0])
        self.down1 = _DownBlock2d(ch[0], ch[1], dropout[1])
        self.down2 = _DownBlock2d(ch[1], ch[2], dropout[2])
        self.down3 = _DownBlock2d(ch[2], ch[3], dropout[3])
        self.down4 = _DownBlock2d(ch[3], ch[4], dropout[4])

    def forward(self, x: Tensor) -> List[Tensor]:
        x0 = self.in_conv(x)
        x1 = self.down1(x0)
        x2 = self.down2(x1)
        x3 = self.down3(x2)
        return [x0, x1, x2, x3, self.down4(x3)]


class _Decoder2d(nn.Module):
    def __init__(self, ch: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.up1 = _UpBlock2d(ch[4], ch[3], ch[3])
        self.up2 = _UpBlock2d(ch[3], ch[2], ch[2])
        self.up3 = _UpBlock2d(ch[2], ch[1], ch[1])
        self.up4 = _UpBlock2d(ch[1], ch[0], ch[0])
        self.out_conv = nn.Conv2d(ch[0], num_classes, kernel_size=3, padding=1)

    def forward(self, enc: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        x0, x1, x2, x3, x4 = enc
        d1 = self.up1(x4, x3)
        d2 = self.up2(d1, x2)
        d3 = self.up3(d2, x1)
        d4 = self.up4(d3, x0)
        return self.out_conv(d4), [d1, d2, d3]


class UNet2D(nn.Module):
    """The published 2D UNet of ICL (``UNet_icl`` without its ICL modules).

    Channels 16..256, encoder dropout [0.05, 0.1, 0.2, 0.3, 0.5], up blocks of a
    1x1 conv then bilinear x2 upsampling with ``align_corners=True`` (what the
    published decoder runs). Input [B, in_channels, H, W] with H, W divisible by 16.

    ``forward(x, return_features=None)``: logits [B, num_classes, H, W]; with
    ``return_features`` (default: ``self.training``) also the decoder outputs
    ``[128ch @ H/8, 64ch @ H/4, 32ch @ H/2]``.
    """

    downsampling = 16

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
    ) -> None:
        super().__init__()
        if len(channels) != 5 or len(dropout) != 5:
            raise ValueError("UNet2D: channels and dropout need 5 entries each")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.channels = tuple(int(c) for c in channels)
        self.feature_channels = (self.channels[3], self.channels[2], self.channels[1])
        self.encoder = _Encoder2d(in_channels, self.channels, dropout)
        self.decoder = _Decoder2d(self.channels, num_classes)

    def forward(self, x: Tensor, return_features: Optional[bool] = None) -> Output:
        _check_divisible(x, self.downsampling, "UNet2D")
        logits, feats = self.decoder(self.encoder(x))
        if return_features is None:
            return_features = self.training
        return (logits, feats) if return_features else logits


# --------------------------------------------------------------------- 3D UNet
class _UnetConv3(nn.Module):
    """Two conv3x3x3-InstanceNorm-ReLU (published ``UnetConv3``)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv3d(in_ch, out_ch, 3, 1, 1), nn.InstanceNorm3d(out_ch), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(nn.Conv3d(out_ch, out_ch, 3, 1, 1), nn.InstanceNorm3d(out_ch), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class _UnetUp3(nn.Module):
    """Trilinear x2 upsampling, concat [skip, up], UnetConv3 (published ``UnetUp3_CT``)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = _UnetConv3(in_ch + out_ch, out_ch)
        self.up = nn.Upsample(scale_factor=(2, 2, 2), mode="trilinear")

    def forward(self, skip: Tensor, x: Tensor) -> Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet3D(nn.Module):
    """The published 3D UNet of ICL (``unet_3D_icl`` without its ICL modules).

    Channels 16..256 (feature_scale 4), InstanceNorm, trilinear up blocks,
    dropout 0.3 on the bottleneck and before the final 1x1x1 conv. Input
    [B, in_channels, D, H, W], each divisible by 16.

    ``forward(x, return_features=None)``: logits [B, num_classes, D, H, W]; with
    ``return_features`` (default: ``self.training``) also
    ``[256ch @ /16 (bottleneck after its dropout), 128ch @ /8, 64ch @ /4]``.
    """

    downsampling = 16

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
    ) -> None:
        super().__init__()
        if len(channels) != 5:
            raise ValueError("UNet3D: channels needs 5 entries")
        f = tuple(int(c) for c in channels)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.channels = f
        self.feature_channels = (f[4], f[3], f[2])
        self.conv1 = _UnetConv3(in_channels, f[0])
        self.maxpool1 = nn.MaxPool3d(2)
        self.conv2 = _UnetConv3(f[0], f[1])
        self.maxpool2 = nn.MaxPool3d(2)
        self.conv3 = _UnetConv3(f[1], f[2])
        self.maxpool3 = nn.MaxPool3d(2)
        self.conv4 = _UnetConv3(f[2], f[3])
        self.maxpool4 = nn.MaxPool3d(2)
        self.center = _UnetConv3(f[3], f[4])
        self.up_concat4 = _UnetUp3(f[4], f[3])
        self.up_concat3 = _UnetUp3(f[3], f[2])
        self.up_concat2 = _UnetUp3(f[2], f[1])
        self.up_concat1 = _UnetUp3(f[1], f[0])
        self.final = nn.Conv3d(f[0], num_classes, 1)
        self.dropout1 = nn.Dropout(p=0.3)
        self.dropout2 = nn.Dropout(p=0.3)
        for m in self.modules():  # published init: Kaiming normal (fan_in) on conv weights
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")

    def forward(self, x: Tensor, return_features: Optional[bool] = None) -> Output:
        _check_divisible(x, self.downsampling, "UNet3D")
        c1 = self.conv1(x)
        c2 = self.conv2(self.maxpool1(c1))
        c3 = self.conv3(self.maxpool2(c2))
        c4 = self.conv4(self.maxpool3(c3))
        center = self.dropout1(self.center(self.maxpool4(c4)))
        u4 = self.up_concat4(c4, center)
        u3 = self.up_concat3(c3, u4)
        u2 = self.up_concat2(c2, u3)
        u1 = self.dropout2(self.up_concat1(c1, u2))
        logits = self.final(u1)
        if return_features is None:
            return_features = self.training
        return (logits, [center, u4, u3]) if return_features else logits
