"""ICLNet: a backbone with the two ICL heads (SSPA, USCL).

Backbone contract: ``backbone(x, return_features=True) -> (logits [B, K, *S],
feats)`` with ``feats`` the list of maps the heads attach to (coarse to fine);
or any backbone whose ``forward(x)`` returns logits, with a ``FeatureTap``
naming the submodules whose outputs are the maps (``icl.attach``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

import icl_kernels

from .head import ICLHead
from .tap import FeatureTap

__all__ = ["ICLNet", "ICLOutputs", "class_presence"]


@dataclass
class ICLOutputs:
    """What ``ICLNet.forward_train`` returns (lists are per level, coarse to fine).

    logits_lab [B_l, K, *S], logits_unlab [B_u, K, *S]; maps_lab (SSPA on the
    labeled batch), maps_unlab (USCL on the unlabeled batch), maps_unlab_sspa
    (SSPA on the unlabeled batch): [B, K, *S_level] each; queries_lab: SSPA's
    updated labeled queries [B_l, K, C_level].
    """

    logits_lab: Tensor
    logits_unlab: Tensor
    maps_lab: List[Tensor]
    maps_unlab: List[Tensor]
    maps_unlab_sspa: List[Tensor]
    queries_lab: Optional[List[Tensor]] = None
    logits_unlab_strong: Optional[Tensor] = None  # the backbone on the strong view (weak-strong training only)


def class_presence(labels: Tensor, num_classes: int) -> Tensor:
    """[B, *S] (or [B, 1, *S]) integer labels -> [B, K] float, 1 where class k occurs in image b."""
    flat = labels.reshape(labels.shape[0], -1)
    present = torch.stack([(flat == k).any(dim=1) for k in range(num_classes)], dim=1)
    return present.float()


def _freeze_query_output(decoder: nn.Module) -> None:
    """Freeze what only the updated queries of a class decoder depend on."""
    for mod in (decoder.attn.proj, decoder.norm2, decoder.mlp):
        mod.requires_grad_(False)


#: the queries of USCL: the batch of SSPA's updated labeled queries (published) or momentum memories
GLOBAL_QUERIES = ("batch", "memory")


class ICLNet(nn.Module):
    """A segmentation backbone trained with Inherent Consistent Learning.

    Args:
        backbone: module following the backbone contract (module docstring).
        feature_channels: C_l of the backbone's feature maps (coarse to fine).
        num_classes: K.
        num_heads: attention heads per level.
        feature_sizes: spatial size per level (needed for ``mixer="mlp"``).
        mixer, faithful, backend, spatial_dims, drop_path, max_mixer_params: see ``ICLHead``.
        global_queries: the queries of USCL at level l. ``"batch"`` (published):
            the batch mean of SSPA's updated labeled queries at level l, with
            gradients flowing. ``"memory"``: ``memories[l]``, a momentum
            ``icl_kernels.PrototypeMemory`` updated (training mode only) with
            SSPA's updated labeled queries, each sample-class weighted by the
            presence of that class in the image's labels; its prototypes are used
            detached.
        momentum: the memories' momentum.
        feature_tap: a ``FeatureTap`` (see ``icl.attach``): the backbone is called
            as ``backbone(x)`` and the maps are the outputs of the tap's
            submodules; None: the backbone follows the contract above.

    Parameters that never receive a gradient in this flow are frozen
    (``requires_grad=False``): USCL's query output path (``attn.proj``, ``norm2``,
    ``mlp`` of each class decoder) and, in memory mode, SSPA's last-level one; so
    every trainable parameter gets a gradient each step (DDP-safe).

    ``forward(x)`` -> backbone logits (inference). ``forward_train(x_lab, x_unlab,
    labels_lab=None) -> ICLOutputs``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_channels: Sequence[int],
        num_classes: int,
        num_heads: Sequence[int],
        feature_sizes: Optional[Sequence[Sequence[int]]] = None,
        mixer: str = "conv",
        global_queries: str = "batch",
        faithful: bool = False,
        momentum: float = 0.99,
        backend: Optional[str] = None,
        spatial_dims: int = 2,
        drop_path: float = 0.02,
        max_mixer_params: Optional[int] = 50_000_000,
        feature_tap: Optional[FeatureTap] = None,
    ) -> None:
        super().__init__()
        if global_queries not in GLOBAL_QUERIES:
            raise ValueError(f"ICLNet: global_queries must be 'batch' or 'memory', got {global_queries!r}")
        self.backbone = backbone
        self.feature_tap = feature_tap
        self.num_classes = int(num_classes)
        self.feature_channels = tuple(int(c) for c in feature_channels)
        self.global_queries = global_queries
        self.spatial_dims = spatial_dims
        common = dict(
            in_channels=self.feature_channels,
            num_classes=num_classes,
            num_heads=num_heads,
            feature_sizes=feature_sizes,
            mixer=mixer,
            faithful=faithful,
            drop_path=drop_path,
            max_mixer_params=max_mixer_params,
            backend=backend,
            spatial_dims=spatial_dims,
        )
        self.sspa = ICLHead(**common)
        # USCL always gets one query per level: it owns neither initial queries nor query convs.
        self.uscl = ICLHead(**common, learned_queries=False, chain_queries=False)
        # Parameters that produce only unused outputs get no gradient; freezing them keeps
        # every trainable parameter used (DDP without find_unused_parameters). USCL's updated
        # queries are never used (as published); in memory mode SSPA's last-level updated
        # queries only feed the (detached) memory.
        for dec in self.uscl.class_decoders:
            _freeze_query_output(dec)
        if global_queries == "memory":
            _freeze_query_output(self.sspa.class_decoders[-1])
            self.memories = nn.ModuleList(
                icl_kernels.PrototypeMemory(self.num_classes, c, momentum=momentum) for c in self.feature_channels
            )
        else:
            self.memories = None

    def backbone_features(self, x: Tensor):
        """(logits, feature maps) of the backbone on ``x``."""
        if self.feature_tap is not None:
            return self.feature_tap(self.backbone, x)
        return self.backbone(x, return_features=True)

    def forward(self, x: Tensor, return_features: bool = False):
        """Inference: the backbone's logits only (``return_features``: also its feature maps)."""
        if return_features:
            return self.backbone_features(x)
        if self.feature_tap is not None:
            return self.backbone(x)
        return self.backbone(x, return_features=False)

    def _global_queries(self, queries_lab: List[Tensor], labels_lab: Optional[Tensor]) -> List[Tensor]:
        if self.global_queries == "batch":
            return [q.mean(dim=0, keepdim=True) for q in queries_lab]
        if self.training:
            if labels_lab is None:
                raise ValueError("ICLNet.forward_train: global_queries='memory' needs labels_lab")
            weights = class_presence(labels_lab, self.num_classes)
            with torch.no_grad():
                for mem, q in zip(self.memories, queries_lab):
                    mem.update(q.detach(), weights)
        return [mem().detach().unsqueeze(0) for mem in self.memories]

    def forward_train(self, x_lab: Tensor, x_unlab: Tensor, labels_lab: Optional[Tensor] = None,
                      x_unlab_strong: Optional[Tensor] = None, joint: bool = False) -> ICLOutputs:
        """The published training flow (two backbone passes, SSPA twice, USCL once).

        With ``x_unlab_strong`` (a perturbed view of ``x_unlab``): the targets of the
        unlabeled losses (the backbone's prediction and SSPA's maps) come from
        ``x_unlab`` without gradients, and USCL runs on the strong view's
        features, so its maps must agree across the perturbation (one more
        backbone forward, no backward through it).

        ``joint``: the labeled images and the unlabeled ones that get gradients
        (``x_unlab``, or ``x_unlab_strong`` when given) go through the backbone in
        one pass instead of two, so its BatchNorm layers normalise them with the
        statistics of the whole batch (as the supervised and FixMatch runs do) and
        keep one kind of running statistics. The heads still see each part on its
        own. Not the published flow (which passes them separately).
        """
        if joint:
            return self._forward_train_joint(x_lab, x_unlab, labels_lab, x_unlab_strong)
        logits_lab, feats_lab = self.backbone_features(x_lab)
        maps_lab, queries_lab = self.sspa(feats_lab)
        queries = self._global_queries(queries_lab, labels_lab)
        if x_unlab_strong is None:
            logits_unlab, feats_unlab = self.backbone_features(x_unlab)
            maps_unlab_sspa, _ = self.sspa(feats_unlab)
            maps_unlab, _ = self.uscl(feats_unlab, queries)
        else:
            with torch.no_grad():
                logits_unlab, feats_weak = self.backbone_features(x_unlab)
                maps_unlab_sspa, _ = self.sspa(feats_weak)
            logits_strong, feats_strong = self.backbone_features(x_unlab_strong)
            maps_unlab, _ = self.uscl(feats_strong, queries)
            return ICLOutputs(logits_lab, logits_unlab, maps_lab, maps_unlab, maps_unlab_sspa, queries_lab,
                              logits_unlab_strong=logits_strong)
        return ICLOutputs(logits_lab, logits_unlab, maps_lab, maps_unlab, maps_unlab_sspa, queries_lab)

    def _forward_train_joint(self, x_lab, x_unlab, labels_lab, x_unlab_strong) -> ICLOutputs:
        L = x_lab.shape[0]
        strong = x_unlab_strong is not None
        if strong:
            with torch.no_grad():
                logits_unlab, feats_weak = self.backbone_features(x_unlab)
                maps_unlab_sspa, _ = self.sspa(feats_weak)
        logits, feats = self.backbone_features(torch.cat([x_lab, x_unlab_strong if strong else x_unlab]))
        feats_lab, feats_unlab = [f[:L] for f in feats], [f[L:] for f in feats]
        logits_lab = logits[:L]
        maps_lab, queries_lab = self.sspa(feats_lab)
        queries = self._global_queries(queries_lab, labels_lab)
        if not strong:
            logits_unlab = logits[L:]
            maps_unlab_sspa, _ = self.sspa(feats_unlab)
        maps_unlab, _ = self.uscl(feats_unlab, queries)
        return ICLOutputs(logits_lab, logits_unlab, maps_lab, maps_unlab, maps_unlab_sspa, queries_lab,
                          logits_unlab_strong=logits[L:] if strong else None)

    def backbone_state_dict(self) -> "Dict[str, Tensor]":
        """The backbone's state_dict with its own keys (what the published scripts export)."""
        return self.backbone.state_dict()

    def load_published_state_dict(self, state: Dict[str, Tensor], strict: bool = True) -> None:
        """Load a published full ``UNet_icl``/``unet_3D_icl``/``SwinUNETR_icl`` state_dict
        (backbone keys, ``sspa.*``, ``uscl.*``); the heads must be ``faithful=True, mixer='mlp'``."""
        back = {k: v for k, v in state.items() if not k.startswith(("sspa.", "uscl."))}
        self.backbone.load_state_dict(back, strict=strict)
        if self.spatial_dims == 3 and any(k.startswith("swinViT.") for k in back):
            from .swinunetr import PublishedPatchMerging

            if not any(isinstance(m, PublishedPatchMerging) for m in self.backbone.modules()):
                warnings.warn("ICLNet.load_published_state_dict: this SwinUNETR merges 3D patches as MONAI does, "
                              "the published SwinUNETR_icl otherwise, so these weights compute another network "
                              "here; build it with patch_merging='published'", stacklevel=2)
        for name in ("sspa", "uscl"):
            sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            # SwinUNETR_icl names the learned queries guide_Q (the UNets: guided_Q)
            if "guide_Q" in sub and "guided_Q" not in sub:
                sub["guided_Q"] = sub.pop("guide_Q")
            if sub or strict:
                getattr(self, name).load_published_state_dict(sub, strict=strict)
