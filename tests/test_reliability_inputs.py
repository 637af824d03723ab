"""Issue 12, classes 4, 5 and 10: NaN/Inf in an evaluated volume, in a checkpoint's weights or in a
training slice is refused with one line naming the file (and slice, or tensor), exit 2, instead of
a silent Dice 0 or a traceback blaming the learning rate; errors raised inside DataLoader workers
reach the user as that one line (the traceback with --debug, or in OUT/error.log)."""
import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from icl.data import DataError, make_synthetic, read_h5
from icl.errors import one_line, unwrap_worker_message
from reliability_helpers import TRAIN, fingerprint, make_checkpoint, one_line_error, run, run_subprocess

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def acdc(tmp_path_factory):
    return make_synthetic(str(tmp_path_factory.mktemp("inputs") / "acdc"), "acdc", num_train=4, seed=0)["root"]


def _poison(path, key="image", index=(1, 3, 4), value=np.nan):
    with h5py.File(path, "r+") as f:
        a = f[key][()]
        a[index] = value
        del f[key]
        f[key] = a


def test_evaluate_refuses_nonfinite_volume_and_keeps_old_results(acdc, tmp_path, capsys):
    ck = make_checkpoint(tmp_path / "w.pt")
    ev = tmp_path / "ev"
    code, err = run(["evaluate", "--checkpoint", ck, "--root", acdc, "--out", str(ev), "--no-progress"], capsys)
    assert code == 0, err
    before = fingerprint(ev)
    bad = tmp_path / "acdc_inf"
    shutil.copytree(acdc, bad)
    target = bad / "data" / "patient008_frame01.h5"  # a test case (test.list)
    _poison(target, value=np.inf)
    code, err = run(["evaluate", "--checkpoint", ck, "--root", str(bad), "--out", str(ev), "--no-progress"], capsys)
    one_line_error(code, err, str(target), "1 infinite value")
    assert fingerprint(ev) == before


def test_checkpoint_with_nan_weights_refused(acdc, tmp_path, capsys):
    key = "encoder.in_conv.conv_conv.0.weight"
    ck = make_checkpoint(tmp_path / "nan.pt", nan_key=key)
    for argv in (["evaluate", "--checkpoint", ck, "--root", acdc, "--out", str(tmp_path / "ev")],
                 ["predict", "--checkpoint", ck, f"{acdc}/data/patient001_frame01.h5", "--out", str(tmp_path / "p")],
                 ["export", "--checkpoint", ck, "--out", str(tmp_path / "e.pt")]):
        code, err = run(argv + ["--no-progress"] if argv[0] != "export" else argv, capsys)
        one_line_error(code, err, "nan.pt", repr(key), "NaN")
    assert not (tmp_path / "e.pt").exists() and not (tmp_path / "p").exists()


def test_reader_names_file_and_slice(tmp_path):
    from icl.data import write_h5

    p = str(tmp_path / "vol.h5")
    img = np.ones((3, 8, 8), np.float32)
    img[2, 1, 1] = np.nan
    write_h5(p, img, np.zeros((3, 8, 8), np.uint8))
    read_h5(p, 3, 2, index=(0, 1))  # a clean slice reads
    with pytest.raises(DataError, match=r"vol\.h5: 'image' slice 2 along axis 0 holds 1 NaN value"):
        read_h5(p, 3, 2, index=(0, 2))
    with pytest.raises(DataError, match=r"vol\.h5: 'image' holds 1 NaN value"):
        read_h5(p, 3, 2)


def test_nonfinite_training_slice_in_a_worker_is_one_line(acdc, tmp_path):
    bad = tmp_path / "acdc_nan"
    shutil.copytree(acdc, bad)
    target = bad / "data" / "slices" / "patient001_frame01_slice_2.h5"  # labeled: drawn in the first iterations
    _poison(target, index=(3, 4))
    out = tmp_path / "run"
    argv = TRAIN + ["--root", str(bad), "--out", str(out)]
    argv[argv.index("--max-iterations") + 1] = "40"
    argv[argv.index("--num-workers") + 1] = "2"
    r = run_subprocess(argv, timeout=900)  # a timeout here would be a loader hang (generous: loaded CI machines)
    line = one_line_error(r.returncode, r.stderr, str(target), "1 NaN value")
    assert len(line) < 300 and "DataLoader worker" not in line and "lower --base-lr" not in r.stderr
    log = (out / "error.log").read_text()  # the traceback is kept in the run folder
    assert "Traceback" in log and "patient001_frame01_slice_2.h5" in log


class _Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise DataError(f"/data/case{i}.h5: 'label' holds the value 9 but num_classes is 4")


def test_worker_exception_unwrapped():
    loader = torch.utils.data.DataLoader(_Broken(), batch_size=1, num_workers=1)
    with pytest.raises(DataError) as ei:
        next(iter(loader))
    raw = str(ei.value)
    assert "Original Traceback" in raw  # what PyTorch hands over
    msg, wrapped = unwrap_worker_message(raw)
    assert wrapped and msg == "/data/case0.h5: 'label' holds the value 9 but num_classes is 4"
    assert one_line(ei.value) == msg
    assert unwrap_worker_message("plain message") == ("plain message", False)


def test_unexpected_error_is_one_line_with_log_and_debug_traceback(acdc, tmp_path, capsys, monkeypatch):
    import icl.train

    def boom(self, batch):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(icl.train._Trainer, "_step", boom)
    out = tmp_path / "run"
    code, err = run(TRAIN + ["--root", acdc, "--out", str(out)], capsys)
    line = one_line_error(code, err, "RuntimeError: kernel exploded second line", str(out / "error.log"),
                          exit_code=1)
    assert "--debug" in line
    assert "Traceback" in (out / "error.log").read_text()
    code, err = run(TRAIN + ["--root", acdc, "--out", str(tmp_path / "run2"), "--debug"], capsys)
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("icl train: error:")
    # the metrics of the failed run are still a valid JSON file
    json.load(open(out / "metrics.json"))
