"""The training options, declared once.

Each field of :class:`TrainConfig` is one option: its type (checked for config
files and dicts), its default, and (in the field's metadata, :func:`option`)
the command-line group, help, metavar and choices. ``icl train``'s flags, the
YAML keys of ``--config``, the type checks and the choice checks all come from
here; choices are read from the registries that own them (methods, ICL views,
backbones, kernel backends, AMP and compile modes, data sets), so a new method
or backend shows in ``icl train --help`` without editing the command line.
Range and cross-option checks live in :mod:`icl.validate` (plus each method's
``check_config``).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from .errors import ConfigError

__all__ = ["GROUPS", "OptionSpec", "TrainConfig", "add_train_arguments", "option", "parse_loss_weights"]

#: the ``icl train --help`` groups, in order
GROUPS = ("data", "model and method", "optimisation", "output")


@dataclass(frozen=True)
class OptionSpec:
    """How one option appears on the command line (None flag: config files only)."""

    group: str
    help: Optional[str] = None
    flag: Optional[str] = ""  # "" -> --field-name; None -> no flag
    metavar: Optional[str] = None
    nargs: Any = None
    parse: Optional[Callable[[str], Any]] = None  # the flag's argument -> value (default: from the type)
    choices: Optional[Callable[[], Sequence[str]]] = None  # read when asked: registries may grow
    argparse_choices: bool = True  # False: only the config check refuses other values (its message)
    const: Any = None
    action: Optional[str] = None  # store_true / store_false (bool fields: store_true by default)
    choice_error: str = ""  # words between the value and "expected one of ..." in the choice error


def option(default: Any, group: str, help: Optional[str] = None, **spec: Any):
    """A TrainConfig field with its command-line description."""
    return field(default=default, metadata={"option": OptionSpec(group, help, **spec)})


# -- where the choices live -------------------------------------------------------------------


def _datasets():
    from .data import DATASETS

    return DATASETS


def _models():
    from .models.registry import model_names

    return model_names()


def _methods():
    from .methods import METHODS

    return tuple(METHODS)


def _icl_views():
    from .methods.icl import VIEWS

    return VIEWS


def _icl_passes():
    from .methods.icl import PASSES

    return PASSES


def _mixers():
    from .models.head import MIXERS

    return MIXERS


def _global_queries():
    from .models.icl_net import GLOBAL_QUERIES

    return GLOBAL_QUERIES


def _backends():
    from icl_kernels.backends import backend_names

    return backend_names()


def _amp_modes():
    from .inference import AMP_MODES

    return AMP_MODES


def _compile_modes():
    from .training.compile import COMPILE_MODES

    return COMPILE_MODES


def _interpolations():
    from .data.transforms import INTERPOLATIONS

    return INTERPOLATIONS


def _fills():
    from .data.transforms import FILLS

    return FILLS


def parse_loss_weights(text: str) -> Dict[str, float]:
    """``a=1,b=0.5`` -> {"a": 1.0, "b": 0.5} (argparse turns the error into a usage error)."""
    out: Dict[str, float] = {}
    for item in text.split(","):
        term, sep, value = item.partition("=")
        term = term.strip()
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep or not term or not math.isfinite(weight):
            raise argparse.ArgumentTypeError(f"expected TERM=WEIGHT[,TERM=WEIGHT...] with finite numbers, "
                                             f"got {item!r} in {text!r}")
        out[term] = weight
    return out


D, M, O, R = GROUPS


@dataclass
class TrainConfig:
    """Every training option (see :func:`icl.train.train`); ``TrainConfig.from_dict`` checks
    keys and types, :meth:`resolve` fills the defaults that depend on other options and
    validates the whole."""

    # data
    dataset: Optional[str] = option(None, D, choices=_datasets, argparse_choices=False,
                                    choice_error="unknown data set; ")
    root: Optional[str] = option(None, D, "data set folder", metavar="DIR")
    num_classes: Optional[int] = option(None, D, "classes including background", metavar="K")
    labeled_num: Optional[int] = option(None, D, "labeled patients (ACDC 2D: 3, 7, 14, 21, 28, 35, 140) or cases",
                                        metavar="N")
    labeled_fraction: Optional[float] = option(None, D, "label the first fraction F of the training slices/cases",
                                               metavar="F")
    patch_size: Optional[List[int]] = option(None, D, "2 sizes: 2D UNet (e.g. 256 256); 3 sizes: 3D UNet "
                                                      "(e.g. 96 96 96)", metavar="S")
    in_channels: Optional[int] = option(None, D, "input channels (default: from the data)", metavar="C")
    slice_axis: Optional[int] = option(None, D, "spatial axis 2D models cut volumes along")
    spacing: Optional[List[float]] = option(None, D, "voxel size of h5 data (for HD95/ASD in mm)")
    normalization: Optional[Any] = option(None, D, "NIfTI: per-channel scheme ct|zscore|percentile|none "
                                                   "(default from dataset.json)", nargs="+")
    target_spacing: Optional[List[float]] = option(None, D, "NIfTI: resample to this voxel size")
    ct_window: Optional[List[float]] = option(None, D, "NIfTI CT window (default -175 250)", nargs=2)
    cache_dir: Optional[str] = option(None, D, "NIfTI: preprocessed-array cache (default OUT/cache)")
    val_fraction: float = option(0.2, D, "share of cases drawn for validation when no list")
    test_fraction: float = option(0.2, D, flag=None)
    intensity_aug: Optional[Any] = option(None, D, "intensity augmentations: 'default' or a list from "
                                                   "gamma,noise,bias", metavar="LIST")
    interpolation: str = option("linear", D, "2D image resampling in training and evaluation (published: nearest)",
                                choices=_interpolations)
    fill: str = option("edge", D, "2D rotation corners (published: zero)", choices=_fills)
    num_workers: int = option(2, D)
    # model / method
    model: str = option("unet", M, "backbone (swinunetr: MONAI's, pip install 'icl-kernels[monai]')",
                        choices=_models)
    model_options: Optional[Dict[str, Any]] = option(None, M, flag=None)
    pretrained: Optional[str] = option(None, M, "initial backbone weights (swinunet: an ImageNet Swin-T checkpoint "
                                                "such as swin_tiny_patch4_window7_224.pth); same as model_options "
                                                "pretrained", metavar="FILE")
    method: str = option("icl", M, choices=_methods)
    icl_views: str = option("one", M, "icl: one view of the unlabeled batch (published), weak targets for USCL on "
                                      "a strong view, also for the backbone's strong-view prediction (all), or plus "
                                      "FixMatch's confident hard-label term on the backbone's strong view "
                                      "(*-confident)", choices=_icl_views)
    icl_passes: str = option("split", M, "icl: the backbone sees labeled and unlabeled images in separate passes "
                                         "(split, published: BatchNorm statistics per part) or in one (joint)",
                             choices=_icl_passes)
    mixer: str = option("conv", M, choices=_mixers)
    global_queries: str = option("batch", M, choices=_global_queries)
    faithful: bool = option(False, M, "published head quirks (for equivalence)")
    max_mixer_params: Optional[int] = option(50_000_000, M, "limit on the parameters of mixer=mlp (the published "
                                                            "2D head needs ~1.1e9)")
    backend: str = option("auto", M, choices=_backends)
    # optimisation
    batch_size: Optional[int] = option(None, O, "per rank (default 16 2D, 4 3D)", metavar="B")
    labeled_bs: Optional[int] = option(None, O, "labeled items per batch (default B/2)", metavar="L")
    max_iterations: int = option(30000, O, metavar="T")
    base_lr: float = option(0.01, O)
    momentum: float = option(0.9, O, flag=None)
    weight_decay: float = option(1e-4, O)
    poly_power: float = option(0.9, O, flag=None)
    loss_weights: Optional[Dict[str, float]] = option(
        None, O, "override the method's loss weights, e.g. pseudo=0,consistency=10 (icl); a method refuses terms "
                 "it does not have", metavar="TERM=W,...", parse=parse_loss_weights)
    consistency_rampup: float = option(0.0, O, "sigmoid ramp-up length (0: none)")
    confidence_threshold: float = option(0.95, O, "fixmatch, unimatch, icl *-confident views: softmax confidence "
                                                  "a pseudo-label needs (default 0.95)")
    amp: str = option("none", O, choices=_amp_modes)
    compile: str = option("none", O, "torch.compile each iteration's forward and losses with this mode "
                                     "(reduce-overhead: CUDA graphs, GPU only); the first iterations compile "
                                     "(minutes on a CPU). Default none", choices=_compile_modes)
    seed: int = option(1337, O)
    deterministic: bool = option(False, O)
    device: Optional[str] = option(None, O, "cpu, cuda, cuda:1 (default: cuda when available)")
    # evaluation / output
    out: Optional[str] = option(None, R, metavar="DIR")
    val_every: int = option(200, R, metavar="V")
    save_every: int = option(1000, R, metavar="N")
    resume: Optional[Union[str, bool]] = option(None, R, "continue from OUT/checkpoints/last.pt (or CKPT)",
                                                nargs="?", const="auto", metavar="CKPT")
    overwrite: bool = option(False, R, "replace the run already in OUT (its checkpoints, logs and results are "
                                       "deleted)")
    allow_resume_changes: bool = option(False, R, "with --resume: continue although training settings differ "
                                                  "from the checkpoint's (each change is warned)")
    overlap: float = option(0.5, R, "3D sliding-window overlap")
    eval_batch_size: int = option(8, R, flag=None)
    num_overlays: int = option(3, R, flag=None)
    test: bool = option(True, R, "skip the final test evaluation", flag="--no-test", action="store_false")
    progress: bool = option(True, R, flag="--no-progress", action="store_false")

    # -- the schema -----------------------------------------------------------------------------
    @classmethod
    def fields(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def options(cls) -> List[Tuple[str, OptionSpec]]:
        return [(f.name, f.metadata["option"]) for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: Dict, origin: str = "config") -> "TrainConfig":
        names = set(cls.fields())
        norm = {str(k).replace("-", "_"): v for k, v in (d or {}).items()}
        unknown = sorted(k for k in norm if k not in names)
        if unknown:
            raise ConfigError(f"{origin}: unknown option(s) {unknown}")
        from .validate import check_types

        return cls(**check_types(cls, norm, origin))

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    # -- derived --------------------------------------------------------------------------------
    @property
    def spatial_dims(self) -> int:
        return len(self.patch_size)

    @property
    def arch(self) -> str:
        """The registered backbone (icl.models.registry) of ``model`` for this patch."""
        from .models.registry import arch_for

        return arch_for(self.model, self.spatial_dims)

    def resolve(self) -> "TrainConfig":
        """Fill defaults that depend on other options and validate (:func:`icl.validate.check_config`);
        returns self."""
        from .validate import check_config

        if self.pretrained:  # the builders read it from model_options
            given = (self.model_options or {}).get("pretrained")
            if given and given != self.pretrained:
                raise ConfigError(f"--pretrained {self.pretrained} and model_options pretrained {given} differ; "
                                  f"give one")
            self.model_options = dict(self.model_options or {}, pretrained=self.pretrained)
        given = (self.model_options or {}).get("pretrained")
        if given and not os.path.isfile(str(given)):
            raise ConfigError(f"--pretrained {given}: file not found")
        check_config(self)
        return self

    def model_config(self) -> Dict:
        # initial weights are no part of the architecture: a model rebuilt from a checkpoint gets its own
        options = self.model_options
        if options and "pretrained" in options:
            options = {k: v for k, v in options.items() if k != "pretrained"}
        return {"arch": self.arch, "backbone_options": options, "in_channels": self.in_channels,
                "num_classes": self.num_classes, "patch_size": list(self.patch_size), "mixer": self.mixer,
                "global_queries": self.global_queries, "faithful": bool(self.faithful), "method": self.method}


def _element_type(t):
    """(parse, nargs) of a field annotation: int/float/str, lists of them as nargs='+'."""
    if typing.get_origin(t) is Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        t = args[0] if len(args) == 1 else str
    if typing.get_origin(t) in (list, List):
        inner = typing.get_args(t)[0]
        return inner, "+"
    if t in (int, float, str):
        return t, None
    return str, None


def add_train_arguments(parser: argparse.ArgumentParser, extra: Optional[Callable] = None) -> None:
    """``icl train``'s flags, from :class:`TrainConfig` (defaults are suppressed: an option not given
    on the command line keeps the config file's value, else the field's default).
    ``extra(groups)`` may add flags that are not options (``--config``) to the groups."""
    S = argparse.SUPPRESS
    groups = {g: parser.add_argument_group(g) for g in GROUPS}
    if extra is not None:
        extra(groups)
    hints = typing.get_type_hints(TrainConfig)
    for name, spec in TrainConfig.options():
        if spec.flag is None:
            continue
        flag = spec.flag or "--" + name.replace("_", "-")
        kwargs: Dict[str, Any] = {"dest": name, "default": S}
        if spec.help:
            kwargs["help"] = spec.help
        if hints[name] is bool:
            kwargs["action"] = spec.action or "store_true"
        else:
            parse, nargs = _element_type(hints[name])
            kwargs["type"] = spec.parse or parse
            if spec.nargs is not None or nargs is not None:
                kwargs["nargs"] = spec.nargs if spec.nargs is not None else nargs
            if spec.const is not None:
                kwargs["const"] = spec.const
            if spec.metavar:
                kwargs["metavar"] = spec.metavar
            if spec.choices is not None:
                choices = list(spec.choices())
                if spec.argparse_choices:
                    kwargs["choices"] = choices
                elif not spec.metavar:
                    kwargs["metavar"] = "{" + ",".join(choices) + "}"
        groups[spec.group].add_argument(flag, **kwargs)
