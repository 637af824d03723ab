"""Command line: ``icl train | evaluate | predict | export | synthetic`` (also ``python -m icl``).

Mistakes (an option, a data file, a checkpoint, an output place: any
:class:`icl.errors.UsageError`) print one line on stderr and exit with code 2;
other failures print one line and exit with code 1, the traceback only with
``--debug`` (training runs also append it to ``OUT/error.log``). SIGINT/SIGTERM
during training exit with 130/143 after writing ``last.pt``. Warnings are one
line each.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from .errors import EXIT_FAILURE, EXIT_USAGE

EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """``icl train``'s flags: every option of icl.config.TrainConfig, plus ``--config``."""
    from .config import add_train_arguments

    def config_flag(groups):
        groups["data"].add_argument("--config", metavar="FILE.yaml", help="options from a YAML file (flags override it)")

    add_train_arguments(p, extra=config_flag)


def _loss_weights(text: str) -> Dict[str, float]:
    """``a=1,b=0.5`` -> {"a": 1.0, "b": 0.5} (see icl.config.parse_loss_weights)."""
    from .config import parse_loss_weights

    return parse_loss_weights(text)


def _backend_names():
    from icl_kernels.backends import backend_names

    return list(backend_names())


def _amp_modes():
    from .inference import AMP_MODES

    return list(AMP_MODES)


def _add_inference_args(p: argparse.ArgumentParser) -> None:
    """Options of ``icl evaluate`` and ``icl predict`` that say how a case is predicted."""
    from .inference import BLENDS, TTA_MODES, WEIGHTINGS, WINDOW_PRESETS

    p.add_argument("--overlap", type=float, nargs="+", metavar="O",
                   help="3D: share of a window its neighbour overlaps, one value or one per axis (default 0.5)")
    p.add_argument("--stride", type=int, nargs="+", metavar="S",
                   help="3D: window steps in voxels, one value or one per axis (instead of --overlap)")
    p.add_argument("--window-weighting", choices=list(WEIGHTINGS),
                   help="3D: weights of a window's voxels when windows overlap (default constant)")
    p.add_argument("--blend", choices=list(BLENDS),
                   help="what windows, mirrors and ensemble members average (default probabilities)")
    p.add_argument("--window-preset", choices=list(WINDOW_PRESETS),
                   help="3D: the windows of a published evaluation (sets --overlap/--stride, "
                        "--window-weighting, --blend)")
    p.add_argument("--sw-batch-size", type=int, metavar="N",
                   help="3D: windows per forward pass (default 4)")
    p.add_argument("--tta", choices=list(TTA_MODES), default="none",
                   help="flip: also predict every mirror of the spatial axes and average (default none)")
    p.add_argument("--batch-size", type=int, default=8, help="2D: slices per forward pass (default 8)")
    p.add_argument("--device")
    p.add_argument("--amp", choices=_amp_modes(), default="none")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="icl", description="Semi-supervised segmentation with Inherent Consistent Learning")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the full traceback of an error")
    p.add_argument("--debug", action="store_true", default=False, help="print the full traceback of an error")
    sub = p.add_subparsers(dest="command", metavar="{demo,train,evaluate,predict,export,synthetic}")
    sub.required = True
    d = sub.add_parser("demo", parents=[common],
                       help="ICL vs supervised-only and a semi-supervised peer on a synthetic brain "
                            "population (offline, about 7 min on 2 CPU cores)")
    d.add_argument("--out", default="icl-demo", help="output folder (default ./icl-demo)")
    d.add_argument("--quick", action="store_true", help="a short smoke run (a minute or two)")
    d.add_argument("--full", action="store_true", help="also train the fully supervised upper bound")
    d.add_argument("--seeds", type=int, help="repeat every run with this many seeds (default 1)")
    d.add_argument("--data-dir", help="reuse (or build) the population here instead of OUT/data")
    d.add_argument("--labeled-slices", type=int, help="labeled slices of the labeled subject (default 2)")
    d.add_argument("--peer", help="the semi-supervised peer: mean-teacher, fixmatch, unimatch or none "
                                  "(default fixmatch)")
    d.add_argument("--iterations", type=int, help="iterations per run")
    d.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    d.add_argument("--jobs", type=int, help="runs trained at a time, each in its own process (default on CPU: one "
                                            "per usable core, at most the number of runs; on GPU 1)")
    d.add_argument("--threads", type=int, help="torch threads per run (default: usable cores // jobs)")
    d.add_argument("--backend", default="auto", choices=_backend_names())
    d.add_argument("--no-progress", dest="progress", action="store_false")

    t = sub.add_parser("train", parents=[common], help="train a model (ICL or the supervised baseline)")
    _add_train_args(t)

    e = sub.add_parser("evaluate", parents=[common], help="evaluate a checkpoint on a split")
    e.add_argument("--checkpoint", required=True, nargs="+", action="extend", metavar="CKPT",
                   help="a checkpoint, or several (an ensemble; the first names the data set and splits)")
    e.add_argument("--dataset", help="default: the checkpoint's")
    e.add_argument("--root", required=True)
    e.add_argument("--split", default="test", choices=["test", "val", "train"])
    e.add_argument("--out", required=True)
    e.add_argument("--num-classes", type=int, help="check against the checkpoint")
    _add_inference_args(e)
    e.add_argument("--spacing", type=float, nargs="+")
    e.add_argument("--no-progress", dest="progress", action="store_false")

    r = sub.add_parser("predict", parents=[common], help="segment h5 or NIfTI files")
    r.add_argument("--checkpoint", required=True, nargs="+", action="extend", metavar="CKPT",
                   help="a checkpoint, or several (an ensemble: probabilities averaged)")
    r.add_argument("inputs", nargs="*", metavar="INPUT", help=".h5, .nii, .nii.gz files or folders of them")
    r.add_argument("--out", required=True)
    _add_inference_args(r)
    r.add_argument("--slice-axis", type=int, help="default: the checkpoint's")
    r.add_argument("--save-probabilities", action="store_true",
                   help="also write OUT/<case>.npz: 'probabilities' [K, *spatial] on the output grid")
    r.add_argument("--probabilities-dtype", choices=["float16", "float32"], default="float16",
                   help="dtype of the saved probabilities (default float16)")
    r.add_argument("--no-progress", dest="progress", action="store_false")

    x = sub.add_parser("export", parents=[common], help="write a backbone-only checkpoint (plain UNet state dict)")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True)

    s = sub.add_parser("synthetic", parents=[common], help="write a tiny synthetic data set")
    s.add_argument("--out", required=True)
    s.add_argument("--layout", default="acdc", choices=["acdc", "la", "brats", "nifti"])
    s.add_argument("--num-train", type=int, default=8)
    s.add_argument("--num-val", type=int, default=2)
    s.add_argument("--num-test", type=int, default=2)
    s.add_argument("--shape", type=int, nargs="+")
    s.add_argument("--num-classes", type=int)
    s.add_argument("--in-channels", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    return p


# ------------------------------------------------------------------ commands


def _train_config(args: argparse.Namespace):
    import yaml

    from .config import TrainConfig
    from .errors import ConfigError

    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    base: Dict = {}
    if getattr(args, "config", None):
        path = args.config
        if not os.path.isfile(path):
            raise ConfigError(f"--config {path}: file not found")
        try:
            with open(path) as f:
                base = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--config {path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
        if not isinstance(base, dict):
            raise ConfigError(f"--config {path}: expected a mapping of option: value")
        base = {str(k).replace("-", "_"): v for k, v in base.items()}
        TrainConfig.from_dict(base, origin=f"--config {path}")  # validates the keys
    if "labeled_num" in given or "labeled_fraction" in given:
        base.pop("labeled_num", None)
        base.pop("labeled_fraction", None)
    if "normalization" in given and isinstance(given["normalization"], list) and len(given["normalization"]) == 1:
        given["normalization"] = given["normalization"][0]
    base.update(given)
    return TrainConfig.from_dict(base)


def cmd_train(args) -> int:
    from .train import train

    cfg = _train_config(args)
    result = train(cfg)
    if result.metrics.get("test"):
        t = result.metrics["test"]["mean"]
        _say(f"test ({result.metrics['test']['num_cases']} cases, {result.metrics['test']['checkpoint']} "
             f"checkpoint): Dice {_f(t.get('dice'))}, Jaccard {_f(t.get('jaccard'))}, HD95 {_f(t.get('hd95'))}, "
             f"ASD {_f(t.get('asd'))}")
    _say(f"results in {result.out}")
    return 0


def _say(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, file=sys.stderr)


def _f(v):
    return "n/a" if v is None else f"{v:.4f}"


def _splits_for(ckpt: Dict, source, split: str) -> List[str]:
    """Case names of ``split``: the data set's list, else the run's splits.json, else recomputed from the config."""
    if source.has_split(split) and split != "train":
        return source.cases(split)
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt["path"])))
    rec = os.path.join(run_dir, "splits.json")
    if os.path.isfile(rec):
        try:
            with open(rec) as f:
                d = json.load(f)
        except (OSError, ValueError) as exc:
            from .errors import ConfigError

            raise ConfigError(f"{rec}: cannot read the run's splits ({exc})") from None
        key = {"train": "train_cases"}.get(split, split)
        if d.get(key):
            return list(d[key])
    from .data import make_splits

    cfg = ckpt.get("config") or {}
    dims = len(ckpt["model_config"]["patch_size"])
    sp = make_splits(source, dims, cfg.get("labeled_num"), cfg.get("labeled_fraction") if cfg.get("labeled_num") is None else None,
                     seed=cfg.get("seed", 1337), val_fraction=cfg.get("val_fraction", 0.2),
                     test_fraction=cfg.get("test_fraction", 0.2))
    if split == "train":
        return list(dict.fromkeys(it.case for it in sp.items))
    return sp.val if split == "val" else sp.test


def cmd_evaluate(args) -> int:
    from .data import build_source
    from .evaluate import evaluate_cases, write_results
    from .rundir import ensure_dir
    from .errors import ConfigError
    from .validate import resolve_device

    device = resolve_device(args.device)
    _check_run_options(args)
    ckpts, nets = _load_models(args.checkpoint, num_classes=args.num_classes)
    ck = ckpts[0]
    mc, dc = ck["model_config"], ck.get("data_config", {})
    if args.spacing is not None and len(args.spacing) != 3:
        raise ConfigError(f"--spacing {' '.join(map(str, args.spacing))}: give 3 values (one per axis of the volumes)")
    dataset = args.dataset or dc.get("dataset")
    if not dataset:
        raise ConfigError("--dataset is required (the checkpoint does not name one)")
    ensure_dir(args.out)
    prep = dc.get("preprocessing") or {}
    opts = {"slice_axis": prep.get("slice_axis"), "spacing": args.spacing or dc.get("spacing")}
    if prep.get("layout") == "nifti":
        opts.update(normalization=prep.get("normalization"), target_spacing=prep.get("target_spacing"),
                    ct_window=prep.get("ct_window"))
    source = build_source(dataset, args.root, int(mc["num_classes"]), **opts)
    names = _splits_for(ck, source, args.split)
    for net in nets:
        net.to(device)
    res = evaluate_cases(nets if len(nets) > 1 else nets[0], source, names, int(mc["num_classes"]),
                         mc["patch_size"], device=device, progress=args.progress, desc=f"evaluate {args.split}",
                         **_predict_options(args))
    paths = write_results(args.out, res, prefix=f"{args.split}_")
    m = res["summary"]["mean"]
    _say(f"{args.split}: {len(names)} cases, Dice {_f(m.get('dice'))}, Jaccard {_f(m.get('jaccard'))}, "
         f"HD95 {_f(m.get('hd95'))}, ASD {_f(m.get('asd'))}; wrote {paths['csv']} and {paths['json']}")
    return 0


def _check_run_options(args) -> None:
    """Ranges of the inference options shared by evaluate and predict."""
    from .errors import ConfigError
    from .inference import WINDOW_PRESETS

    for o in args.overlap or ():
        if not 0.0 <= o < 1.0:
            raise ConfigError(f"--overlap must be in [0, 1), got {o}")
    for st in args.stride or ():
        if st < 1:
            raise ConfigError(f"--stride must be positive voxel steps, got {st}")
    for flag, v in (("--overlap", args.overlap), ("--stride", args.stride)):
        if v is not None and len(v) not in (1, 3):
            raise ConfigError(f"{flag} {' '.join(map(str, v))}: give 1 value or 3 (one per axis)")
    if args.overlap is not None and args.stride is not None:
        raise ConfigError("--overlap and --stride: give one of them (both place the windows)")
    if args.window_preset is not None:
        preset = WINDOW_PRESETS[args.window_preset]
        given = [f for f, v in (("--overlap", args.overlap), ("--stride", args.stride),
                                ("--window-weighting", args.window_weighting), ("--blend", args.blend))
                 if v is not None]
        if given:
            raise ConfigError(f"--window-preset {args.window_preset} sets {', '.join(sorted(preset))}; "
                              f"drop {', '.join(given)} or the preset")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    if args.sw_batch_size is not None and args.sw_batch_size < 1:
        raise ConfigError(f"--sw-batch-size must be positive, got {args.sw_batch_size}")
    if getattr(args, "slice_axis", None) is not None and args.slice_axis not in (0, 1, 2):
        raise ConfigError(f"--slice-axis {args.slice_axis}: expected 0, 1 or 2 (an axis of the volumes)")


def _predict_options(args) -> Dict:
    """``icl.predict`` keyword arguments from the inference flags (after _check_run_options)."""
    from .inference import SW_BATCH_SIZE, WINDOW_PRESETS

    opts = {"overlap": 0.5, "stride": None, "weighting": "constant", "blend": "probabilities",
            "sw_batch_size": SW_BATCH_SIZE}
    if args.window_preset is not None:
        preset = dict(WINDOW_PRESETS[args.window_preset])
        opts.update(preset)
    for key, v in (("overlap", args.overlap), ("stride", args.stride), ("weighting", args.window_weighting),
                   ("blend", args.blend), ("sw_batch_size", args.sw_batch_size)):
        if v is not None:
            opts[key] = tuple(v) if isinstance(v, list) else v
    opts.update(tta=args.tta, batch_size=args.batch_size, amp=args.amp)
    return opts


#: What every member of an ensemble must share: (section, key) of the checkpoint.
ENSEMBLE_KEYS = (("model_config", "num_classes"), ("model_config", "in_channels"), ("model_config", "patch_size"),
                 ("data_config", "interpolation"), ("preprocessing", "layout"), ("preprocessing", "slice_axis"),
                 ("preprocessing", "normalization"), ("preprocessing", "ct_window"),
                 ("preprocessing", "target_spacing"))


def _ensemble_field(ck: Dict, section: str, key: str):
    dc = ck.get("data_config") or {}
    part = (dc.get("preprocessing") or {}) if section == "preprocessing" else (ck.get(section) or {})
    v = part.get(key)
    return list(v) if isinstance(v, tuple) else v


def _load_models(paths: Sequence[str], num_classes: Optional[int] = None):
    """Checkpoints and their inference networks; an ensemble's members must agree on classes and geometry."""
    from . import checkpoint as C
    from .errors import ConfigError

    ckpts = [C.load(p) for p in paths]
    for p, ck in zip(paths[1:], ckpts[1:]):
        for section, key in ENSEMBLE_KEYS:
            a, b = _ensemble_field(ckpts[0], section, key), _ensemble_field(ck, section, key)
            if a != b:
                raise ConfigError(f"--checkpoint {paths[0]} and {p} differ in {key} ({a} vs {b}); an ensemble "
                                  f"needs one set of classes and one geometry")
    return ckpts, [C.backbone_from_checkpoint(ck, num_classes=num_classes) for ck in ckpts]


def _collect_inputs(inputs: Sequence[str]):
    from .errors import ConfigError

    files = []
    for inp in inputs:
        if os.path.isdir(inp):
            found = sorted(glob.glob(os.path.join(inp, "*.h5")) + glob.glob(os.path.join(inp, "*.nii"))
                           + glob.glob(os.path.join(inp, "*.nii.gz")))
            if not found:
                raise ConfigError(f"INPUT {inp}: no .h5, .nii or .nii.gz files in this folder")
            files.extend(found)
        elif os.path.isfile(inp):
            if not (inp.endswith(".h5") or inp.endswith(".nii") or inp.endswith(".nii.gz")):
                raise ConfigError(f"INPUT {inp}: expected a .h5, .nii or .nii.gz file")
            files.append(inp)
        else:
            raise ConfigError(f"INPUT {inp}: no such file or folder")
    unique, seen = [], set()
    for f in files:  # one input named twice (a folder and a file in it) is predicted once
        if os.path.realpath(f) not in seen:
            seen.add(os.path.realpath(f))
            unique.append(f)
    return unique


def _nifti_groups(files: Sequence[str], in_channels: int):
    """Group NIfTI files into cases: <case>_XXXX.nii.gz channel files, or one file per case."""
    import re

    from .errors import ConfigError

    groups: Dict[str, Dict[int, str]] = {}
    singles = []
    for f in files:
        base = os.path.basename(f)
        stem = base[:-7] if base.endswith(".nii.gz") else base[:-4]
        m = re.match(r"^(.*)_(\d{4})$", stem)
        if m and in_channels == 1 and m.group(2) != "0000":
            m = None  # one channel: amos_0016.nii.gz is a case, not channel 16
        if m:
            groups.setdefault(os.path.join(os.path.dirname(f), m.group(1)), {})[int(m.group(2))] = f
        else:
            singles.append((stem, [f]))
    cases = []
    for key, ch in sorted(groups.items()):
        if sorted(ch) != list(range(in_channels)):
            raise ConfigError(f"INPUT {key}_XXXX: channel files {sorted(ch)} found; the model takes "
                              f"{in_channels} channel(s) (_0000 .. _{in_channels - 1:04d})")
        cases.append((os.path.basename(key), [ch[c] for c in range(in_channels)]))
    for stem, fl in singles:
        if in_channels != 1:
            raise ConfigError(f"INPUT {fl[0]}: the model takes {in_channels} channels; name the files <case>_0000.nii.gz ...")
        cases.append((stem, fl))
    return cases


def _check_output_names(out: str, h5s: Sequence[str], niis) -> None:
    """Each prediction is named after its input: two inputs with one name (a/case.h5 and
    b/case.h5; a NIfTI case and a channel file of the same name) would overwrite each other."""
    from .errors import ConfigError

    owner: Dict[str, str] = {}
    targets = [(os.path.basename(f), f) for f in h5s]
    targets += [(name + (".nii.gz" if paths[0].endswith(".nii.gz") else ".nii"), paths[0]) for name, paths in niis]
    for target, source in targets:
        if target in owner:
            raise ConfigError(f"INPUT {owner[target]} and {source}: both predictions would be written to "
                              f"{os.path.join(out, target)}; predict them into different --out folders, or "
                              f"rename one")
        owner[target] = source


def _split_inputs(args) -> None:
    """``--checkpoint A.pt B.pt case.nii.gz``: argparse gives the inputs to --checkpoint; inputs
    (.h5, .nii, .nii.gz, folders) at its end are moved back to INPUT."""
    from .errors import ConfigError

    ck = list(args.checkpoint)
    moved = []
    while len(ck) > 1 and (ck[-1].endswith((".h5", ".nii", ".nii.gz")) or os.path.isdir(ck[-1])):
        moved.insert(0, ck.pop())
    args.checkpoint, args.inputs = ck, moved + list(args.inputs)
    if not args.inputs:
        raise ConfigError("INPUT: give at least one .h5, .nii or .nii.gz file or folder to predict")


def _save_probabilities(path: str, probs, dtype: str, affine=None) -> str:
    """``probabilities`` [K, *spatial] in ``dtype`` (and the input's ``affine`` for NIfTI) in a compressed npz."""
    import numpy as np

    tmp = path[:-4] + ".tmp.npz"
    extra = {"affine": np.asarray(affine, dtype=np.float64)} if affine is not None else {}
    np.savez_compressed(tmp, probabilities=probs.astype(dtype), **extra)
    os.replace(tmp, path)
    return path


def cmd_predict(args) -> int:
    import numpy as np
    from tqdm import tqdm

    from .data import load_nifti_case, read_h5, write_h5, write_nifti
    from .data.io import h5_image_info
    from .errors import ConfigError
    from .inference import predict
    from .rundir import ensure_dir
    from .validate import resolve_device

    device = resolve_device(args.device)
    _check_run_options(args)
    _split_inputs(args)
    files = _collect_inputs(args.inputs)
    out_real = os.path.realpath(args.out)
    clash = [f for f in files if os.path.realpath(os.path.dirname(os.path.abspath(f))) == out_real]
    if clash:  # predictions take the input's name: they would replace the inputs
        raise ConfigError(f"--out {args.out}: holds the input {clash[0]}, which its prediction would replace; "
                          f"choose another --out")
    ckpts, nets = _load_models(args.checkpoint)
    ck = ckpts[0]
    mc = ck["model_config"]
    prep = (ck.get("data_config") or {}).get("preprocessing") or {}
    ensure_dir(args.out)
    for net in nets:
        net.to(device)
    model = nets if len(nets) > 1 else nets[0]
    in_ch = int(mc["in_channels"])
    slice_axis = args.slice_axis if args.slice_axis is not None else prep.get("slice_axis", 0)
    h5s = [f for f in files if f.endswith(".h5")]
    niis = _nifti_groups([f for f in files if not f.endswith(".h5")], in_ch)
    _check_output_names(args.out, h5s, niis)
    if args.save_probabilities:
        owner: Dict[str, str] = {}
        for stem, src in [(os.path.basename(f)[:-3], f) for f in h5s] + [(n, ps[0]) for n, ps in niis]:
            if stem in owner:
                raise ConfigError(f"INPUT {owner[stem]} and {src}: both probabilities would be written to "
                                  f"{os.path.join(args.out, stem + '.npz')}; predict them into different --out folders")
            owner[stem] = src
    K = int(mc["num_classes"])
    dtype = np.uint8 if K <= 255 else np.int16
    opts = dict(_predict_options(args), patch_size=mc["patch_size"], slice_axis=slice_axis, device=device,
                return_probs=bool(args.save_probabilities))
    written = []
    nifti_prep = prep if prep.get("layout") == "nifti" else {"normalization": None}
    h5_info = {f: h5_image_info(f) for f in h5s}  # every input readable before the first prediction is written

    def run(image, output_shape=None):
        got = predict(model, image, output_shape=output_shape, **opts)
        return got if args.save_probabilities else (got, None)

    bar = tqdm(total=len(h5s) + len(niis), desc="predict", disable=not args.progress)
    for f in h5s:
        nd, attrs = h5_info[f]
        vol_dims = 2 if nd is not None and ((in_ch == 1 and nd == 2) or (in_ch > 1 and nd == 3)) else 3
        image, _ = read_h5(f, vol_dims, None, need_label=False)
        pred, probs = run(image)
        out = os.path.join(args.out, os.path.basename(f))
        write_h5(out, None, pred.astype(dtype), **{k: v for k, v in attrs.items()})
        written.append(out)
        if probs is not None:
            _save_probabilities(out[:-3] + ".npz", probs, args.probabilities_dtype)
        bar.update(1)
    for name, paths in niis:
        case = load_nifti_case(paths, None, nifti_prep, name=name)
        pred, probs = run(case.image, output_shape=case.meta.get("original_shape"))
        ending = ".nii.gz" if paths[0].endswith(".nii.gz") else ".nii"
        out = os.path.join(args.out, name + ending)
        write_nifti(out, pred.astype(dtype), case.affine, case.meta.get("header"))
        written.append(out)
        if probs is not None:
            _save_probabilities(os.path.join(args.out, name + ".npz"), probs, args.probabilities_dtype,
                                case.affine)
        bar.update(1)
    bar.close()
    _say(f"wrote {len(written)} prediction(s) to {args.out}" + (" with probabilities" if args.save_probabilities else ""))
    return 0


def cmd_export(args) -> int:
    from . import checkpoint as C
    from .rundir import ensure_file_parent

    ensure_file_parent(args.out)
    if os.path.exists(args.out) and os.path.realpath(args.out) == os.path.realpath(args.checkpoint):
        from .errors import ConfigError

        raise ConfigError(f"--out {args.out}: is the --checkpoint itself; the export would replace it")
    ck = C.load(args.checkpoint)
    C.export_backbone(ck, args.out)
    mc = ck["model_config"]
    from .models import get_backbone

    cls = get_backbone(mc["arch"]).title or mc["arch"]
    _say(f"wrote {args.out}: {cls}(in_channels={mc['in_channels']}, num_classes={mc['num_classes']}) state dict")
    return 0


def cmd_synthetic(args) -> int:
    from .data import make_synthetic
    from .rundir import ensure_dir

    ensure_dir(args.out)
    info = make_synthetic(args.out, args.layout, num_train=args.num_train, num_val=args.num_val,
                          num_test=args.num_test, shape=args.shape, num_classes=args.num_classes,
                          in_channels=args.in_channels, seed=args.seed)
    ds = {"brats": "brats2019"}.get(args.layout, args.layout)
    _say(f"wrote a synthetic {args.layout} data set to {args.out} ({info['num_classes']} classes); "
         f"train with --dataset synthetic (or {ds}) --root {args.out} --num-classes {info['num_classes']}")
    return 0


def cmd_demo(args) -> int:
    from .demo.template import MissingDemoDependency
    from .demo.run import run_demo

    try:
        run_demo(out=args.out, quick=args.quick, full=args.full, seeds=args.seeds, data_dir=args.data_dir,
                 labeled_slices=args.labeled_slices, peer=args.peer, iterations=args.iterations,
                 device=args.device, backend=args.backend, progress=args.progress, jobs=args.jobs,
                 threads=args.threads)
    except MissingDemoDependency as exc:
        print(f"icl demo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"icl demo: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


COMMANDS = {"demo": cmd_demo, "train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "export": cmd_export,
            "synthetic": cmd_synthetic}


def _one_line_warnings(prog: str):
    """warnings.showwarning that prints ``prog: warning: message`` (one line, no source line)."""
    def show(message, category, filename, lineno, file=None, line=None):
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{prog}: warning: {' '.join(str(message).split())}", file=file or sys.stderr)
    return show


#: The command line's thread environment, set before torch loads (OpenMP reads it once): waiting
#: OpenMP threads sleep instead of spinning. Spinning threads collapse on shared cores (measured: 2
#: threads on 2 busy cores ran a training step several times slower than 1; docs/training.md,
#: "Threads on shared machines"). Set OMP_WAIT_POLICY=ACTIVE to opt out. Library users' processes
#: are left alone: importing icl sets nothing.
CLI_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    import traceback
    import warnings

    for key, value in CLI_ENVIRONMENT.items():
        os.environ.setdefault(key, value)

    from .errors import UsageError, one_line

    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    if hasattr(args, "debug"):
        del args.debug  # not an option of the commands
    from .train import TrainingInterrupted

    prog = f"icl {args.command}"
    old_show = warnings.showwarning
    if not debug:
        warnings.showwarning = _one_line_warnings(prog)
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingInterrupted as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 128 + int(exc.signum)  # 130 for SIGINT, 143 for SIGTERM
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a fault, not a mistake: still one line; the traceback on request
        if debug:
            traceback.print_exc()
            hint = ""
        else:
            log = getattr(exc, "icl_log", None)
            hint = f" (traceback in {log}; --debug prints it)" if log else " (rerun with --debug for the traceback)"
        print(f"{prog}: error: {type(exc).__name__}: {one_line(exc)}{hint}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        warnings.showwarning = old_show


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
