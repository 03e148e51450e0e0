"""Writing files and folders so that a kill never leaves one that looks complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HASH_CHUNK = 16 << 20  # bytes read at a time when hashing a model file of a few GB
# sha256 of files by (resolved path, size, mtime in ns): a judge of a few GB is hashed once per process.
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Write JSON to a temporary name, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=indent, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a JSON-lines file (none when it does not exist yet: a stage not yet run)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def append_jsonl(path: Path, row: dict) -> None:
    """One complete line per record, flushed and synced: a kill leaves every earlier record intact."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """Replace a JSON-lines file with ``rows`` in one rename (a kill leaves the old file or the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def looks_local(name_or_path: str) -> bool:
    """Paths are explicit (absolute, ./, ../, ~) or exist; anything else is a hub id."""
    return str(name_or_path).startswith(("/", "./", "../", "~")) or os.path.exists(name_or_path)


def relative_to(path: str | Path, folder: str | Path) -> str:
    """``path`` relative to ``folder`` when it lies inside it (so the folder can move), else unchanged.

    What a sweep writes about itself (``export/export.json``, a job's ``result.json``) names its
    files this way; :func:`inside` reads them back, and the absolute paths of older files too.
    """
    p, root = Path(path), Path(folder).resolve()
    try:
        return p.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def inside(folder: str | Path, path: str | Path, recorded_folder: str | Path | None = None) -> Path:
    """A path written by :func:`relative_to`, as a path on this machine.

    Relative: below ``folder``. Absolute (older files): as written, unless it no longer exists and lies
    under ``recorded_folder`` (where the folder was when it was written), then at the same place below
    ``folder``: a sweep written before paths were relative still works after it has moved.
    """
    p = Path(path)
    if not p.is_absolute():
        return Path(folder) / p
    if recorded_folder and not p.exists():
        try:
            return Path(folder) / p.relative_to(Path(recorded_folder))
        except ValueError:
            pass
    return p


def file_sha256(path: str | Path, cache_file: Path | None = None) -> str:
    """sha256 of a file, read in chunks, remembered by path, size and modification time.

    Remembered in the process and, with ``cache_file``, in a JSON file across processes: a 2.4 GB
    judge is hashed once, not once per sweep. A file replaced in place gets a new size or mtime,
    hence a new hash.
    """
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _FILE_HASHES:
        return _FILE_HASHES[key]
    known: dict = {}
    if cache_file is not None and Path(cache_file).is_file():
        try:
            known = json.loads(Path(cache_file).read_text())
        except (OSError, ValueError):
            known = {}  # a damaged cache only costs a re-hash
        entry = known.get(str(path))
        if isinstance(entry, dict) and (entry.get("size"), entry.get("mtime_ns")) == key[1:]:
            _FILE_HASHES[key] = entry["sha256"]
            return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    _FILE_HASHES[key] = digest.hexdigest()
    if cache_file is not None:
        known[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _FILE_HASHES[key]}
        write_json_atomic(Path(cache_file), known)
    return _FILE_HASHES[key]
