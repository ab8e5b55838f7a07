"""One run per OUT_DIR: an exclusive, non-blocking lock on OUT_DIR/.lock.

Two runs writing the same checkpoint, metrics.jsonl and exports would overwrite each other's files;
the second is refused at start-up with RunDirBusy naming the directory and the first one's pid. The
lock is the kernel's (flock), so it is released when the holder exits or is killed (even kill -9):
a stale .lock file never blocks a later run.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

LOCK_FILE = ".lock"


class RunDirBusy(RuntimeError):
    """Another live process holds OUT_DIR's lock."""


@contextlib.contextmanager
def run_lock(out_dir: str | Path, enabled: bool = True):
    """Hold OUT_DIR/.lock for the block (create OUT_DIR if needed); RunDirBusy when another process
    holds it. Under torchrun only rank 0 takes it (enabled=is_main): the ranks of one job share
    OUT_DIR. Take it before recover_checkpoint_dir, which must not race a live run's save. Where the
    platform has no flock (not POSIX) the block runs unlocked."""
    if not enabled:
        yield None
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield None
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not O_TRUNC: the holder's pid is in it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise RunDirBusy(f"{out_dir} is in use by another run (pid {holder}, holding {path}); "
                             f"wait for it to finish, stop it, or choose another output directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # while still holding it; the kernel drops the lock on close or death
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
