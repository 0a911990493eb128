"""Atomic output folders: build in a hidden sibling, rename into place only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


class OutputExistsError(FileExistsError):
    pass


def check_output(out: Path, overwrite: bool) -> None:
    """Fail before any work is done, not after minutes of export."""
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder")
    if not out.parent.exists():
        raise OutputExistsError(f"the parent folder {out.parent} does not exist")


@contextlib.contextmanager
def staged_dir(out: Path, overwrite: bool = False):
    """Yield a temporary folder beside ``out``; on success it becomes ``out``, on any error it vanishes."""
    out = Path(out).absolute()
    check_output(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any folder
    try:
        yield tmp
        if out.exists():  # --overwrite: swap, then remove the old one
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:  # KeyboardInterrupt too: never leave a partial bundle
        shutil.rmtree(tmp, ignore_errors=True)
        raise
