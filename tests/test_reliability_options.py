"""Issue 12, classes 8 and 9: every option is checked (against the data where it needs it) before
training starts, and each mistake is one line naming the option or file, exit 2, no traceback,
with nothing of an earlier result destroyed."""
import os
import shutil

import h5py
import pytest
import torch

from icl.data import make_synthetic
from icl.train import ConfigError, TrainConfig
from reliability_helpers import TRAIN, fingerprint, make_checkpoint, one_line_error, run, run_subprocess

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def acdc(tmp_path_factory):
    return make_synthetic(str(tmp_path_factory.mktemp("opts") / "acdc"), "acdc", num_train=4, seed=0)["root"]


def _train(acdc, out, *extra):
    return TRAIN + ["--root", acdc, "--out", str(out)] + list(extra)


NO_GPU = not torch.cuda.is_available()


@pytest.mark.parametrize("extra,needles", [
    (["--spacing", "1", "1"], ["--spacing 1.0 1.0", "3 axes"]),
    (["--spacing", "1", "0", "1"], ["--spacing", "positive"]),
    (["--slice-axis", "3"], ["--slice-axis 3"]),
    (["--num-workers", "-1"], ["--num-workers", "-1"]),
    (["--labeled-num", "2", "--labeled-fraction", "1.0"], ["exactly one of --labeled-num and --labeled-fraction"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--val-fraction", "1.5"], ["--val-fraction"]),
    (["--base-lr", "-1"], ["--base-lr"]),
    (["--target-spacing", "1", "1"], ["--target-spacing", "3 values"]),
    (["--device", "tpu"], ["--device 'tpu'"]),
    (["--device", "cuda:99"] if not NO_GPU else ["--device", "cuda"], ["--device cuda"]),
    (["--resume", "--overwrite"], ["--resume", "--overwrite"]),
    (["--seed", "-3"], ["--seed", "non-negative", "-3"]),
    (["--seed", str(2 ** 64 + 5)], ["--seed", "non-negative", str(2 ** 64 + 5)]),
    (["--amp", "bf16", "--backend", "cpu"], ["--backend cpu", "--amp bf16", "bfloat16"]),
])
def test_bad_training_options_refused_before_training(acdc, tmp_path, capsys, extra, needles):
    out = tmp_path / "run"
    code, err = run(_train(acdc, out, *extra), capsys)
    one_line_error(code, err, *needles)
    assert not (out / "checkpoints").exists() and not (out / "config.yaml").exists()


def test_labeled_fraction_one_with_icl(acdc, tmp_path, capsys):
    argv = _train(acdc, tmp_path / "run")
    i = argv.index("--labeled-num")
    del argv[i:i + 2]
    code, err = run(argv + ["--labeled-fraction", "1.0"], capsys)
    one_line_error(code, err, "--labeled-fraction 1.0", "--method icl", "unlabeled")
    # the supervised baseline may label everything
    code, err = run(argv + ["--labeled-fraction", "1.0", "--method", "supervised"], capsys)
    assert code == 0, err


def test_edge_seed_and_amp_with_a_backend_that_takes_it_train(acdc, tmp_path, capsys):
    """The refusals above are exact: the largest accepted seed trains, and --amp bf16 with a
    backend whose kernels take bfloat16 tokens (torch) trains."""
    code, err = run(_train(acdc, tmp_path / "run", "--seed", str(2 ** 63 - 1), "--amp", "bf16", "--backend", "torch"),
                    capsys)
    assert code == 0, err


@pytest.mark.skipif(not NO_GPU, reason="checks a machine without a GPU")
def test_cuda_backend_without_gpu(acdc, tmp_path, capsys):
    code, err = run(_train(acdc, tmp_path / "run", "--backend", "cuda"), capsys)
    one_line_error(code, err, "--backend cuda", "cannot run on cpu")
    ck = make_checkpoint(tmp_path / "w.pt")
    code, err = run(["evaluate", "--checkpoint", ck, "--root", acdc, "--out", str(tmp_path / "e"),
                     "--device", "cuda"], capsys)
    one_line_error(code, err, "--device cuda", "no GPU")


@pytest.mark.parametrize("yaml_text,needles", [
    ("max_iterations: many\n", ["max_iterations", "--max-iterations", "integer", "'many'"]),
    ("patch_size: 32\n", ["patch_size", "list"]),
    ("base_lr: fast\n", ["base_lr", "number"]),
    ("deterministic: maybe\n", ["deterministic", "true or false"]),
    ("loss_weights: [1, 2]\n", ["loss_weights", "mapping"]),
    ("- a\n- b\n", ["expected a mapping"]),
])
def test_wrong_typed_config_values(acdc, tmp_path, capsys, yaml_text, needles):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    code, err = run(_train(acdc, tmp_path / "run", "--config", str(cfg)), capsys)
    one_line_error(code, err, "c.yaml", *needles)


def test_config_types_in_python_api():
    with pytest.raises(ConfigError, match=r"num_workers \(--num-workers\) must be an integer, got '2'"):
        TrainConfig.from_dict({"num_workers": "2"})
    assert TrainConfig.from_dict({"max_iterations": 3e4}).max_iterations == 30000  # YAML's 3.0e4 is fine
    assert TrainConfig.from_dict({"resume": True}).resume is True


def test_out_places_that_cannot_be_written(acdc, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep")
    ck = make_checkpoint(tmp_path / "w.pt")
    vol = os.path.join(acdc, "data", "patient001_frame01.h5")
    cases = [
        (_train(acdc, f), "icl train", f"--out {f}"),
        (["predict", "--checkpoint", ck, vol, "--out", str(f), "--no-progress"], "icl predict", f"--out {f}"),
        (["predict", "--checkpoint", ck, vol, "--out", str(f / "x"), "--no-progress"], "icl predict", "--out"),
        (["synthetic", "--out", str(f)], "icl synthetic", f"--out {f}"),
        (["synthetic", "--out", str(f / "x")], "icl synthetic", "cannot create"),
        (["export", "--checkpoint", ck, "--out", str(f / "x.pt")], "icl export", f"--out {f / 'x.pt'}"),
        (["export", "--checkpoint", ck, "--out", str(tmp_path)], "icl export", "is a folder"),
        (["evaluate", "--checkpoint", ck, "--root", acdc, "--out", str(f)], "icl evaluate", f"--out {f}"),
    ]
    for argv, prog, needle in cases:
        code, err = run(argv, capsys)
        line = one_line_error(code, err, needle)
        assert line.startswith(f"{prog}: error:"), line
    assert f.read_text() == "keep"
    # predictions named like their inputs would replace them
    code, err = run(["predict", "--checkpoint", ck, vol, "--out", os.path.dirname(vol)], capsys)
    one_line_error(code, err, "would replace")


def test_resume_with_changed_training_settings(acdc, tmp_path, capsys):
    """Issue 23, faults: a resume that would train differently (here the learning rate) is refused,
    naming the setting, old and new; --allow-resume-changes continues with a warning; what only
    changes how the run executes (--val-every, --num-workers) passes."""
    out = tmp_path / "run"
    code, err = run(_train(acdc, out), capsys)
    assert code == 0, err
    more = ["--max-iterations", "3", "--resume"]
    code, err = run(_train(acdc, out, "--base-lr", "0.5", *more), capsys)
    one_line_error(code, err, "--resume", "base_lr: 0.01 -> 0.5", "--allow-resume-changes")
    code, err = run(_train(acdc, out, "--val-every", "1", "--num-workers", "1", "--max-iterations", "3",
                           "--resume"), capsys)
    assert code == 0, err
    assert "max_iterations" in err and "base_lr" not in err  # only the longer schedule is warned
    code, err = run(_train(acdc, out, "--base-lr", "0.5", "--max-iterations", "4", "--resume",
                           "--allow-resume-changes"), capsys)
    assert code == 0 and "base_lr was 0.01" in err, err


@pytest.mark.parametrize("layout,dataset,list_name,entry", [
    ("acdc", "acdc", "train_slices.list", "../../../outside/slices/x"),
    ("acdc", "acdc", "test.list", "/elsewhere/patient001_frame01"),
    ("la", "la", "train.list", "../../outside/case"),
    ("brats", "brats2019", "val.txt", "/elsewhere/BraTS19_x"),
])
def test_list_entries_stay_inside_the_data_root(tmp_path, capsys, layout, dataset, list_name, entry):
    """Issue 23, containment: a list entry that resolves outside --root (after '..', or an absolute
    path) is refused, naming the list file and the entry, before anything is read."""
    root = make_synthetic(str(tmp_path / layout), layout, num_train=4, seed=0)["root"]
    path = os.path.join(root, list_name)
    with open(path, "a") as fh:
        fh.write(entry + "\n")
    argv = ["train", "--dataset", dataset, "--root", root, "--out", str(tmp_path / "run"), "--num-classes", "4",
            "--labeled-fraction", "0.5", "--patch-size", *(["32", "32"] if layout == "acdc" else ["32"] * 3),
            "--batch-size", "2", "--labeled-bs", "1", "--max-iterations", "1", "--no-progress", "--num-workers", "0"]
    code, err = run(argv, capsys)
    one_line_error(code, err, list_name, repr(entry), "outside")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_list_entries_in_subfolders_of_the_root_are_cases():
    from icl.data.io import _leaves_its_folder

    assert not _leaves_its_folder("patient001") and not _leaves_its_folder("group/a") \
        and not _leaves_its_folder("a/../b")
    assert _leaves_its_folder("../x") and _leaves_its_folder("a/../../x") and _leaves_its_folder("/x")


def test_predict_refuses_inputs_whose_outputs_collide(acdc, tmp_path, capsys):
    """Issue 23, outputs: predictions take their input's name, so two inputs of one name would
    leave one prediction; refused before anything is predicted, naming both inputs."""
    import numpy as np

    ck = make_checkpoint(tmp_path / "w.pt")
    good = os.path.join(acdc, "data", "patient001_frame01.h5")
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shutil.copy(good, tmp_path / d / "case.h5")
    out = tmp_path / "pred"
    code, err = run(["predict", "--checkpoint", ck, str(tmp_path / "a"), str(tmp_path / "b" / "case.h5"),
                     "--out", str(out), "--no-progress"], capsys)
    one_line_error(code, err, str(tmp_path / "a" / "case.h5"), str(tmp_path / "b" / "case.h5"), "case.h5")
    assert not out.exists() or not any(out.iterdir())
    # the same file named twice (its folder and itself) is one input, predicted once
    code, err = run(["predict", "--checkpoint", ck, str(tmp_path / "a"), str(tmp_path / "a" / "case.h5"),
                     "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["case.h5"]
    nib = pytest.importorskip("nibabel")
    vol = np.zeros((8, 32, 32), np.float32)
    (tmp_path / "n").mkdir()
    for name in ("z_0000.nii.gz", "z.nii.gz"):  # one channel: z_0000 is case z, as is z
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "n" / name))
    code, err = run(["predict", "--checkpoint", ck, str(tmp_path / "n"), "--out", str(tmp_path / "p2"),
                     "--no-progress"], capsys)
    one_line_error(code, err, "z_0000.nii.gz", "z.nii.gz", "both predictions")


def test_h5_declaring_an_enormous_dataset_is_refused_before_reading(acdc, tmp_path, capsys):
    """Issue 23, containment class 2: a chunked dataset of 10^11 elements never written (a small
    file) is refused naming the file, the dataset and its shape, in predict and in training."""
    big = tmp_path / "big.h5"
    with h5py.File(big, "w") as h:
        h.create_dataset("image", shape=(1000, 10000, 10000), dtype="float32", chunks=(1, 100, 100))
        h.create_dataset("label", shape=(1000, 10000, 10000), dtype="uint8", chunks=(1, 100, 100))
    assert big.stat().st_size < 1 << 20
    ck = make_checkpoint(tmp_path / "w.pt")
    code, err = run(["predict", "--checkpoint", ck, str(big), "--out", str(tmp_path / "p"), "--no-progress"], capsys)
    one_line_error(code, err, "big.h5", "'image'", "(1000, 10000, 10000)", "GiB")
    root = tmp_path / "acdc"
    shutil.copytree(acdc, root)
    victim = root / "data" / "slices" / sorted(os.listdir(root / "data" / "slices"))[0]
    with h5py.File(victim, "w") as h:
        h.create_dataset("image", shape=(100000, 1000000), dtype="float32", chunks=(100, 100))
        h.create_dataset("label", shape=(100000, 1000000), dtype="uint8", chunks=(100, 100))
    code, err = run(_train(str(root), tmp_path / "run"), capsys)
    one_line_error(code, err, victim.name, "'image'", "(100000, 1000000)")


@pytest.mark.parametrize("where,key,value,needle", [
    ("data_config.preprocessing", "slice_axis", 9, "data_config.preprocessing.slice_axis 9"),
    ("model_config", "patch_size", [0, 0], "model_config.patch_size [0, 0]"),
    ("data_config", "interpolation", "cubic", "data_config.interpolation 'cubic'"),
    ("model_config", "num_classes", 1, "model_config.num_classes 1"),
])
def test_checkpoint_with_hostile_settings_is_refused(acdc, tmp_path, capsys, where, key, value, needle):
    """Issue 23, containment class 3: what a checkpoint stores is checked like the command line,
    and the error names the checkpoint and the field."""
    ck = make_checkpoint(tmp_path / "w.pt")
    c = torch.load(ck, weights_only=True)
    target = c
    for part in where.split("."):
        target = target.setdefault(part, {})
    target[key] = value
    torch.save(c, ck)
    vol = os.path.join(acdc, "data", "patient001_frame01.h5")
    for argv in (["predict", "--checkpoint", ck, vol, "--out", str(tmp_path / "p"), "--no-progress"],
                 ["evaluate", "--checkpoint", ck, "--root", acdc, "--out", str(tmp_path / "e"), "--no-progress"]):
        code, err = run(argv, capsys)
        one_line_error(code, err, "w.pt", needle)


def test_corrupt_h5_for_predict(acdc, tmp_path, capsys):
    ck = make_checkpoint(tmp_path / "w.pt")
    good = os.path.join(acdc, "data", "patient001_frame01.h5")
    bad = tmp_path / "trunc.h5"
    bad.write_bytes(open(good, "rb").read()[:1500])  # a real truncated file
    noimg = tmp_path / "noimage.h5"
    with h5py.File(noimg, "w") as h:
        h["label"] = [1, 2]
    out = tmp_path / "pred"
    for f, needle in ((bad, "cannot read h5 file"), (noimg, "no 'image' dataset")):
        code, err = run(["predict", "--checkpoint", ck, good, str(f), "--out", str(out), "--no-progress"], capsys)
        one_line_error(code, err, str(f), needle)
        assert fingerprint(out) == {}  # refused before the first prediction was written


def test_unreadable_lists_and_missing_listed_files(acdc, tmp_path, capsys):
    root = tmp_path / "d"
    shutil.copytree(acdc, root)
    lst = root / "train_slices.list"
    original = lst.read_bytes()
    lst.write_bytes(b"\xff\xfe\x00\x81binary")
    code, err = run(_train(str(root), tmp_path / "r1"), capsys)
    one_line_error(code, err, str(lst), "not a text file")
    lst.write_bytes(original + b"patient004_frame01_slice_9\n")
    code, err = run(_train(str(root), tmp_path / "r2"), capsys)
    one_line_error(code, err, "1 training file(s)", "patient004_frame01_slice_9.h5", "do not exist")


@pytest.mark.parametrize("argv,needles", [
    (["--num-classes", "0"], ["--num-classes 0", "at least 2"]),
    (["--layout", "acdc", "--shape", "32", "32"], ["--shape 32 32", "Z H W"]),
    (["--layout", "la", "--shape", "0", "16", "16"], ["--shape 0 16 16"]),
    (["--num-train", "0"], ["--num-train 0"]),
])
def test_synthetic_options(tmp_path, capsys, argv, needles):
    out = tmp_path / "s"
    code, err = run(["synthetic", "--out", str(out)] + argv, capsys)
    one_line_error(code, err, *needles)
    assert fingerprint(out) == {}


def test_subprocess_exit_code_and_single_line(acdc, tmp_path):
    r = run_subprocess(_train(acdc, tmp_path / "run", "--num-workers", "-1"), timeout=600)
    one_line_error(r.returncode, r.stderr, "icl train: error: --num-workers must be 0 or more, got -1")


def test_export_onto_its_own_checkpoint_refused(tmp_path, capsys):
    ck = make_checkpoint(tmp_path / "w.pt")
    before = fingerprint(tmp_path)
    code, err = run(["export", "--checkpoint", ck, "--out", ck], capsys)
    one_line_error(code, err, "--checkpoint itself")
    assert fingerprint(tmp_path) == before
