"""Issue 12, classes 2 and 3: a second run into the same --out is refused unless --resume or
--overwrite says what to do (and --overwrite replaces every file of the old run, best.pt
included); stale .<name>.tmp<pid> files of killed saves are removed when a run starts."""
import json
import subprocess
import sys

import pytest
import torch

from icl.data import make_synthetic
from icl.rundir import clean_stale_temporaries
from reliability_helpers import TRAIN, fingerprint, one_line_error, run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def acdc(tmp_path_factory):
    return make_synthetic(str(tmp_path_factory.mktemp("rundir") / "acdc"), "acdc", num_train=4, seed=0)["root"]


def _first_run(acdc, out, capsys):
    # validation every iteration: the run has a best.pt, which a replacing run without validation must not keep
    code, err = run(TRAIN + ["--root", acdc, "--out", str(out), "--val-every", "1"], capsys)
    assert code == 0, err
    assert (out / "checkpoints" / "best.pt").is_file()
    (out / "notes.txt").write_text("mine")  # a user's file: never the trainer's to delete
    return fingerprint(out)


def test_second_run_refused_then_overwrite_replaces_every_file(acdc, tmp_path, capsys):
    out = tmp_path / "run"
    before = _first_run(acdc, out, capsys)
    # the same command again: refused before anything is read or written
    code, err = run(TRAIN + ["--root", acdc, "--out", str(out)], capsys)
    one_line_error(code, err, f"--out {out}", "already holds a run", "--resume", "--overwrite")
    assert fingerprint(out) == before
    # --resume and --overwrite together make no sense
    code, err = run(TRAIN + ["--root", acdc, "--out", str(out), "--resume", "--overwrite"], capsys)
    one_line_error(code, err, "--resume", "--overwrite")
    assert fingerprint(out) == before
    # --overwrite with a mistake elsewhere: refused, and the old run is still whole
    code, err = run(TRAIN + ["--root", acdc, "--out", str(out), "--overwrite", "--spacing", "1", "1"], capsys)
    one_line_error(code, err, "--spacing")
    assert fingerprint(out) == before
    # --overwrite: a new run with 3 iterations and no validation; nothing of the old run is left
    argv = TRAIN + ["--root", acdc, "--out", str(out), "--overwrite", "--seed", "5"]
    argv[argv.index("--max-iterations") + 1] = "3"
    code, err = run(argv, capsys)
    assert code == 0, err
    assert not (out / "checkpoints" / "best.pt").exists()
    assert (out / "notes.txt").read_text() == "mine"
    m = json.load(open(out / "metrics.json"))
    assert m["config"]["seed"] == 5 and m["iteration"] == 3 and m["val"] == [] and m["best"] is None
    assert len((out / "log.csv").read_text().splitlines()) == 1 + 3
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 3


def test_stale_temporaries_removed_at_start(acdc, tmp_path, capsys):
    out = tmp_path / "run"
    _first_run(acdc, out, capsys)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid whose process is gone, as after a kill during a save
    ck = out / "checkpoints"
    stale = [ck / f".last.pt.tmp{dead.pid}", ck / f".best.pt.tmp{dead.pid}"]
    for p in stale:
        p.write_bytes(b"\0" * 1024)
    live = ck / ".last.pt.tmp1"  # pid 1 is alive: a save that may be in progress is left alone
    live.write_bytes(b"\0")
    last_before = (ck / "last.pt").read_bytes()
    argv = TRAIN + ["--root", acdc, "--out", str(out), "--resume"]
    argv[argv.index("--max-iterations") + 1] = "3"
    code, err = run(argv, capsys)
    assert code == 0, err
    assert not any(p.exists() for p in stale)
    assert live.exists()
    assert (ck / "last.pt").read_bytes() != last_before
    assert torch.load(ck / "last.pt", weights_only=True)["iteration"] == 3
    # the function itself: only .<name>.tmp<pid> names of dead writers
    keep = ck / "tmp123"
    keep.write_text("x")
    assert clean_stale_temporaries(str(ck)) == [] and keep.exists()


def test_refused_run_files_untouched_on_bad_out(acdc, tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("precious")
    code, err = run(TRAIN + ["--root", acdc, "--out", str(f)], capsys)
    one_line_error(code, err, f"--out {f}", "not a folder")
    code, err = run(TRAIN + ["--root", acdc, "--out", str(f / "sub")], capsys)
    one_line_error(code, err, f"--out {f / 'sub'}", "cannot create")
    assert f.read_text() == "precious"


def test_a_running_train_holds_its_folder(acdc, tmp_path, capsys):
    """Issue 23, faults class 5: while a run holds OUT, a second icl train into it is refused naming
    the holder's PID (before it reads or writes anything); a lock left by a killed run blocks no one."""
    import os
    import signal

    from icl.rundir import LOCK_FILE

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from icl.rundir import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
                               "print('locked', flush=True); time.sleep(120)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = fingerprint(out)
        code, err = run(TRAIN + ["--root", acdc, "--out", str(out)], capsys)
        one_line_error(code, err, f"--out {out}", f"PID {holder.pid}", "running")
        assert fingerprint(out) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / LOCK_FILE).is_file()  # the killed holder's file stays, unlocked
    code, err = run(TRAIN + ["--root", acdc, "--out", str(out)], capsys)
    assert code == 0, err
    assert not (out / LOCK_FILE).exists() and os.path.isfile(out / "checkpoints" / "last.pt")


def _full_disk(monkeypatch, real_save, fail_after=0):
    """torch.save that writes part of the file and fails as PyTorch does on a full disk."""
    import shutil
    from collections import namedtuple

    calls = {"n": 0}

    def save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] <= fail_after:
            return real_save(obj, f, *a, **k)
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 12")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, (1 << 30) - 4096, 4096))


def test_a_full_disk_during_a_save_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Issue 23, faults class 4: the error names the file, the disk and the space, and says the
    previous checkpoint is intact (it is)."""
    import os

    from icl import checkpoint as C

    path = tmp_path / "checkpoints" / "last.pt"
    C.save_atomic({"w": torch.ones(1000)}, str(path))
    _full_disk(monkeypatch, torch.save)
    with pytest.raises(C.CheckpointWriteError) as ei:
        C.save_atomic({"w": torch.zeros(1000)}, str(path))
    msg = str(ei.value)
    assert str(path) in msg and "full" in msg and "4096" not in msg and "MB free" in msg
    assert "the previous last.pt is intact" in msg
    monkeypatch.undo()
    assert torch.equal(torch.load(str(path), weights_only=True)["w"], torch.ones(1000))
    assert sorted(os.listdir(path.parent)) == ["last.pt"]  # no temporary left behind


def test_a_full_disk_during_training_is_one_line(acdc, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _full_disk(monkeypatch, torch.save, fail_after=1)  # the first last.pt is written, the second is not
    code, err = run(TRAIN + ["--root", acdc, "--out", str(out), "--save-every", "1"], capsys)
    lines = [l for l in err.strip().splitlines() if "error" in l]
    assert code == 1 and len(lines) == 1, err
    assert "cannot write" in lines[0] and "last.pt" in lines[0] and "full" in lines[0]
    assert "previous last.pt is intact" in lines[0]
