"""Issue 12, class 1: SIGTERM to the whole process group (as timeout, SLURM and systemd send it)
ends training with exit 143 and a good last.pt, whatever the number of DataLoader workers;
the workers do not outlive the run, and --resume continues from the checkpoint."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from icl import checkpoint as C
from icl.data import make_synthetic
from reliability_helpers import REPO, TRAIN

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def acdc(tmp_path_factory):
    return make_synthetic(str(tmp_path_factory.mktemp("sig") / "acdc"), "acdc", num_train=4, seed=0)["root"]


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_to_process_group_saves_and_exits_143(acdc, tmp_path, workers):
    out = tmp_path / "run"
    argv = [a for a in TRAIN] + ["--root", acdc, "--out", str(out), "--save-every", "0"]
    argv[argv.index("--max-iterations") + 1] = "100000"
    argv[argv.index("--num-workers") + 1] = str(workers)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "icl"] + argv, cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        deadline = time.time() + 600  # generous: starting torch on a loaded machine is slow
        log = out / "log.csv"
        while time.time() < deadline and p.poll() is None:
            if log.is_file() and len(log.read_text().splitlines()) > 3:  # header + 3 iterations
                break
            time.sleep(0.2)
        assert p.poll() is None, p.communicate()[1]
        os.killpg(p.pid, signal.SIGTERM)  # the main process and every loader worker at once
        _, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 143, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "interrupted at iteration" in lines[0] and "--resume" in lines[0], err
    assert "DataLoader worker" not in err and "Traceback" not in err
    ck = C.load(str(out / "checkpoints" / "last.pt"))  # a complete, loadable training checkpoint
    assert ck["kind"] == "train" and ck["iteration"] >= 3
    rows = len((out / "log.csv").read_text().splitlines()) - 1
    assert ck["iteration"] == rows  # saved after the last logged iteration
    assert not [f for f in os.listdir(out / "checkpoints") if ".tmp" in f]
    deadline = time.time() + 15  # no worker outlives the run
    while _group_alive(p.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not _group_alive(p.pid)
    # the checkpoint continues: two more iterations, nothing duplicated in the log
    it = int(ck["iteration"])
    argv[argv.index("--max-iterations") + 1] = str(it + 2)
    r = subprocess.run([sys.executable, "-m", "icl"] + argv + ["--resume"], cwd=REPO, capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert len((out / "log.csv").read_text().splitlines()) == it + 3
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["iteration"] == it + 2
