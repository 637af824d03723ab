"""Output places: folders and files a command writes, and the run folder of ``icl train``.

A run folder holds one run. A second run into it must say what it wants:
``--resume`` continues the run, ``--overwrite`` replaces it (every file the
trainer writes is removed first, so that no file of the old run, such as its
``best.pt``, is left beside the new one); without either it is refused before
anything is read or written. The preprocessed-data cache (``cache/``) and files
the trainer does not write are kept.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import traceback
from typing import List, Optional

from .errors import ConfigError

# what the trainer writes into a run folder (see icl.train)
RUN_FILES = ("config.yaml", "splits.json", "log.csv", "metrics.json", "error.log")
RUN_DIRS = ("checkpoints", "tensorboard", "test", "plots", "overlays")
# files that show a run was started here
_EVIDENCE = (os.path.join("checkpoints", "last.pt"), os.path.join("checkpoints", "best.pt"), "metrics.json",
             "log.csv")
# the lock a running icl train holds on its run folder (see RunLock)
LOCK_FILE = ".icl-run.lock"
# save_atomic's temporaries: .<name>.tmp<pid>
_TMP = re.compile(r"^\.(.+)\.tmp(\d+)$")


def ensure_dir(path: str, flag: str = "--out") -> str:
    """Create folder ``path`` if needed and check that files can be written in it."""
    if not path:
        raise ConfigError(f"{flag} is required")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot create the folder ({exc.strerror or exc})") from None
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".icl_write_test_"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write in this folder ({exc.strerror or exc})") from None
    return path


def ensure_file_parent(path: str, flag: str = "--out") -> str:
    """``path`` names a file to write: not a folder, and its folder can be created and written."""
    if not path:
        raise ConfigError(f"{flag} is required")
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: is a folder; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        ensure_dir(parent, flag)
    except ConfigError as exc:
        raise ConfigError(f"{flag} {path}: cannot write the file ({str(exc).split(': ', 1)[-1]})") from None
    return path


def previous_run(out: str) -> List[str]:
    """Files of a run already in ``out`` (relative paths; empty when there is none)."""
    return [p for p in _EVIDENCE if os.path.isfile(os.path.join(out, p))]


class RunLock:
    """An exclusive lock on a run folder for the life of a run, so two runs cannot write one
    folder at once: ``fcntl.flock`` on ``OUT/.icl-run.lock``, which records the holder's PID.
    The system drops the lock when its holder exits, however it ends, so a killed run blocks
    no one (its file stays, unlocked, and the next run takes it); a run that ends normally
    removes the file, so a refused run leaves the folder as it found it."""

    def __init__(self, out: str):
        self.path = os.path.join(out, LOCK_FILE)
        self._fh = None

    def acquire(self) -> "RunLock":
        import fcntl

        while True:
            fh = open(self.path, "a+")
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.seek(0)
                holder = fh.read().strip() or "unknown"
                fh.close()
                raise ConfigError(f"--out {os.path.dirname(self.path)}: another icl train (PID {holder}) is "
                                  f"running into this folder; wait for it, stop it, or choose another --out") from None
            try:  # the holder we waited on may have removed the file: lock the one the path names now
                same = os.path.samestat(os.fstat(fh.fileno()), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            try:
                os.unlink(self.path)  # while still held, so no one locks the file being removed
            except FileNotFoundError:
                pass
            self._fh.close()
            self._fh = None


def check_run_dir(out: str, resume, overwrite: bool) -> None:
    """Refuse an output folder that is a file, cannot be written, or holds a run that neither
    ``resume`` nor ``overwrite`` says what to do with. Creates ``out``; reads nothing else."""
    resuming = resume not in (None, False, "", "none")
    if resuming and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: continue the run or replace it")
    ensure_dir(out)
    found = previous_run(out)
    if found and not resuming and not overwrite:
        raise ConfigError(f"--out {out} already holds a run ({', '.join(found)}); continue it with --resume "
                          f"or replace it with --overwrite (or choose another --out)")


def clear_run(out: str) -> None:
    """Remove everything the trainer writes into ``out`` (for --overwrite)."""
    for name in RUN_FILES:
        p = os.path.join(out, name)
        if os.path.isfile(p) or os.path.islink(p):
            os.remove(p)
    for name in RUN_DIRS:
        p = os.path.join(out, name)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours from an earlier run in this process: not being written now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(folder: str) -> List[str]:
    """Remove ``.<name>.tmp<pid>`` files that a killed save left (the writer's process is gone)."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        m = _TMP.match(name)
        if m and not _alive(int(m.group(2))):
            p = os.path.join(folder, name)
            try:
                os.remove(p)
                removed.append(p)
            except OSError:
                pass
    return removed


def prepare_run_dir(out: str, overwrite: bool) -> None:
    """After every check passed (rank 0 only): clear the old run for --overwrite, drop stale temporaries."""
    if overwrite:
        clear_run(out)
    clean_stale_temporaries(os.path.join(out, "checkpoints"))
    clean_stale_temporaries(out)


def log_failure(out: Optional[str], exc: BaseException) -> Optional[str]:
    """Append ``exc``'s traceback to ``out/error.log``; returns its path (None if it cannot be written)."""
    if not out or not os.path.isdir(out):
        return None
    path = os.path.join(out, "error.log")
    try:
        with open(path, "a") as f:
            f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
            f.write("\n")
    except OSError:
        return None
    return path
