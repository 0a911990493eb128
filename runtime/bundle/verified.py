"""Checksums that are not recomputed on every start.

A file whose sha256 matched once is recorded with its identity: device, inode, size, mtime and
ctime (nanoseconds). While all five are unchanged the file is taken as verified; any write, a
replacement or a restored mtime changes at least the ctime, and the file is hashed again. The
record lives in the user's cache folder (a bundle may be read-only, and a copied bundle never
matches a record made for another inode).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

_lock = threading.Lock()


def sha256_file(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _record_file() -> Path | None:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cpm-deploy"
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return base / "verified.json" if os.access(base, os.W_OK) else None


def _load(record: Path | None) -> dict:
    if record is None:
        return {}
    try:
        data = json.loads(record.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # a missing or damaged record only costs a re-hash


def verify_files(files: dict[Path, str], on_mismatch) -> list[Path]:
    """Check each ``path -> expected sha256``; call ``on_mismatch(path)`` for a wrong one.

    Returns the files that were actually hashed (the others matched the record).
    """
    record_path = _record_file()
    with _lock:
        record = _load(record_path)
    hashed = []
    for path, expected in files.items():
        key = str(path.resolve())
        identity = _identity(path)
        if record.get(key) == [*identity, expected]:
            continue
        hashed.append(path)
        if sha256_file(path) != expected:
            record.pop(key, None)
            on_mismatch(path)
            continue
        record[key] = [*identity, expected]
    if hashed and record_path is not None:
        with _lock:
            merged = {**_load(record_path), **record}
            tmp = record_path.with_name(f".verified.{os.getpid()}.{threading.get_ident()}.partial")
            try:
                tmp.write_text(json.dumps(merged))
                tmp.replace(record_path)
            except OSError:
                tmp.unlink(missing_ok=True)
    return hashed
