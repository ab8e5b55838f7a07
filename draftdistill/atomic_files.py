"""Files and directories written so that a reader, or a process killed at any instant, never sees
half of one: a temporary sibling is written, flushed to disk, then renamed into place. Used by the
checkpoints (draftdistill/train/checkpoint.py) and the exports (draftdistill/export/)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(directory: str | Path):
    """Yield a temporary directory beside `directory`; when the block succeeds it replaces
    `directory` (swap_into_place), when it fails it is removed: readers never see a half-written one."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        yield tmp
        fsync_tree(tmp)  # the renames below must not reach the disk before the bytes they publish
        swap_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomically(path: str | Path, write) -> None:
    """write(tmp) into a temporary sibling of `path`, then rename it to `path`: readers never see
    half a file, and a failed write leaves nothing behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def old_path(directory: Path) -> Path:
    return directory.with_name(directory.name + ".old")


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def fsync_tree(root: Path) -> None:
    """Flush every file under `root`, and the directories, to the disk (a rename is only as durable
    as the bytes behind it); best effort where the filesystem refuses."""
    for path in sorted(root.rglob("*"), reverse=True) + [root]:
        fsync_path(path)


def swap_into_place(tmp: Path, directory: Path) -> None:
    """Replace `directory` by the complete `tmp`: directory -> directory.old, tmp -> directory, remove
    .old. Killed at any point, it leaves a state draftdistill.train.checkpoint.recover_checkpoint_dir turns
    back into one complete directory (the previous or the new one). A stale .old (left by a killed save;
    `directory` is then the complete one) is removed first, so it never blocks the rename."""
    old = old_path(directory)
    if directory.exists():
        if old.exists() or old.is_symlink():
            remove_path(old)
        os.replace(directory, old)
    os.replace(tmp, directory)
    fsync_dir(directory.parent)
    if old.exists() or old.is_symlink():
        remove_path(old)


def fsync_path(path: Path) -> None:
    """Flush one file or directory to the disk; best effort where the filesystem refuses."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


fsync_dir = fsync_path  # a directory's entries (the renames in it) are flushed the same way


def temporaries(directory: Path) -> list[Path]:
    """What a killed save leaves beside `directory`: atomic_directory's .{name}-XXXXXXXX and
    save_sharded's .{name}-tmp."""
    return sorted(p for p in directory.parent.glob(f".{directory.name}-*") if p.is_dir() and not p.is_symlink())
