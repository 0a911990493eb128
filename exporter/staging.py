"""Atomic output folders: build in a hidden sibling, rename into place only when complete."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ExportError


class OutputExistsError(ExportError, FileExistsError):
    pass


def check_output(out: Path, overwrite: bool) -> None:
    """Fail before any work is done, not after minutes of export."""
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder")
    if not out.parent.exists():
        raise OutputExistsError(f"the parent folder {out.parent} does not exist")


def _lock(folder: Path, blocking: bool = True) -> int | None:
    """An exclusive flock on the folder itself: held while an export works in it, released by the
    kernel when the process ends, however it ends (kill -9 and the OOM killer included)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


def remove_stale(out: Path) -> list[Path]:
    """Staging folders of earlier exports to ``out`` that died before cleaning up (a live export's
    folder is locked and stays)."""
    removed = []
    for folder in sorted(out.parent.glob(f".{out.name}.partial-*")) + sorted(out.parent.glob(f".{out.name}.old-*")):
        try:
            fd = _lock(folder, blocking=False)
        except OSError:
            continue
        if fd is not None:
            shutil.rmtree(folder, ignore_errors=True)
            os.close(fd)
            removed.append(folder)
            logging.getLogger("cpm_deploy").warning("removed %s, left by an export that was killed", folder.name)
    return removed


@contextlib.contextmanager
def staged_dir(out: Path, overwrite: bool = False):
    """Yield a temporary folder beside ``out``; on success it becomes ``out``, on any error it vanishes."""
    out = Path(out).absolute()
    check_output(out, overwrite)
    remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    lock = _lock(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any folder
    try:
        yield tmp
        if out.exists():  # --overwrite: swap, then remove the old one
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            old_lock = _lock(old)
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
            os.close(old_lock)
        else:
            os.replace(tmp, out)
    except BaseException:  # KeyboardInterrupt too: never leave a partial bundle
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)
