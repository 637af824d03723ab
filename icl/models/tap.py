"""FeatureTap: the outputs of named submodules of a backbone, taken with forward hooks
while the backbone runs its own, unchanged ``forward`` (how ``icl.attach`` reads
the maps of a backbone that does not return them)."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

from torch import Tensor, nn

__all__ = ["FeatureTap", "ModuleRef"]

ModuleRef = Union[str, nn.Module]


class FeatureTap:
    """Runs ``backbone(x)`` and collects the outputs of named submodules with forward hooks.

    Hooks are registered for one call and removed after it, so the backbone is
    left unchanged (state_dict, deepcopy, pickling, DDP). Each tapped module
    must run exactly once per forward and return a tensor.
    """

    def __init__(self, backbone: nn.Module, feature_modules: Sequence[ModuleRef]) -> None:
        names = dict((id(m), n) for n, m in backbone.named_modules())
        resolved: List[str] = []
        for ref in feature_modules:
            if isinstance(ref, nn.Module):
                if id(ref) not in names or names[id(ref)] == "":
                    raise ValueError("attach: feature_modules entry is a module that is not a submodule of the backbone")
                resolved.append(names[id(ref)])
            elif isinstance(ref, str):
                try:
                    backbone.get_submodule(ref)
                except AttributeError as exc:
                    raise ValueError(f"attach: feature_modules names {ref!r}, which the backbone does not have "
                                     f"({type(backbone).__name__}); see backbone.named_modules()") from exc
                resolved.append(ref)
            else:
                raise ValueError(f"attach: feature_modules entries must be submodule names or modules, got {type(ref).__name__}")
        if not resolved:
            raise ValueError("attach: feature_modules must name at least one submodule")
        self.names: Tuple[str, ...] = tuple(resolved)

    def __call__(self, backbone: nn.Module, x: Tensor) -> Tuple[Tensor, List[Tensor]]:
        got: Dict[int, Tensor] = {}
        handles = []

        def hook_for(i: int, name: str):
            def hook(module, inputs, output):
                if i in got:
                    raise RuntimeError(f"attach: feature module {name!r} ran more than once in one forward; "
                                       f"tap a module that runs once")
                if not isinstance(output, Tensor):
                    raise RuntimeError(f"attach: feature module {name!r} returned {type(output).__name__}, "
                                       f"not a tensor; tap a submodule whose output is the feature map")
                got[i] = output
            return hook

        try:
            for i, name in enumerate(self.names):
                handles.append(backbone.get_submodule(name).register_forward_hook(hook_for(i, name)))
            logits = backbone(x)
        finally:
            for h in handles:
                h.remove()
        missing = [n for i, n in enumerate(self.names) if i not in got]
        if missing:
            raise RuntimeError(f"attach: feature module(s) {missing} did not run in the backbone's forward")
        if isinstance(logits, (tuple, list)):
            raise RuntimeError(f"attach: the backbone returned a {type(logits).__name__}; a tapped backbone must "
                               f"return the logits tensor (wrap it, or give it return_features and no feature_modules)")
        return logits, [got[i] for i in range(len(self.names))]
