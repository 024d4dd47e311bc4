"""Atomic writes: a reader (or a crash) never sees half a file, and nobody's file is replaced unasked.

Every write goes to a temporary name in the same directory and is renamed into place only when
complete (``os.replace`` is atomic on one filesystem). One helper for files, one for directories.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hire.errors import OverwriteError


def refuse_overwrite(path: str | Path, force: bool, flag: str = "--out") -> None:
    """Raise OverwriteError when ``path`` exists and ``force`` is False."""
    path = Path(path)
    if path.exists() and not force:
        kind = "directory" if path.is_dir() else "file"
        raise OverwriteError(f"{path} exists ({kind}); pass --force to overwrite it or choose another {flag}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; write it inside the block. On success it is renamed
    to ``path``; on an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


@contextmanager
def atomic_dir(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; fill it inside the block. On success it
    becomes ``path`` (an existing ``path`` is replaced only with ``replace=True``, else the rename
    fails with OverwriteError); on an exception it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            if not replace:
                raise OverwriteError(f"{path} appeared while it was being written; not replacing it")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)  # moved aside, removed once the new one is in place
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_files(directory: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``directory``; on success every file written in it
    is moved into ``directory`` (created if missing), each by one atomic rename: a reader sees each
    file whole, new or old, never half written. For a directory that holds other files too (a
    training run's checkpoint beside its exported model), which ``atomic_dir`` would replace."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        yield tmp
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                target = directory / path.relative_to(tmp)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file, read in 4 MiB blocks (model files are hundreds of MB)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# --- checked cache entries: a directory of files derived from a source file -------------------
MANIFEST = "hire-manifest.json"


def source_key(source: Path, version: int) -> str:
    """A cache entry's name for what was derived from ``source``: its stem and a hash of its path,
    size and mtime (a changed file gets a new entry) and of the deriving code's ``version``."""
    st = source.stat()
    raw = f"{version}:{source.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return f"{source.stem}-{hashlib.sha256(raw.encode()).hexdigest()[:12]}"


def write_manifest(entry: Path, source: Path, version: int) -> None:
    """Sizes and sha256 of every file in ``entry``, which ``verify_cache`` checks before each use."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(entry.iterdir()) if p.is_file()
    }
    (entry / MANIFEST).write_text(json.dumps({"format": version, "source": str(source), "files": files}, indent=1))


def verify_cache(entry: Path) -> str | None:
    """None if ``entry`` is a complete cache entry, else why not."""
    manifest_path = entry / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the conversion did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return f"unreadable manifest ({err})"
    for name, meta in files.items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{name} has {path.stat().st_size} bytes, expected {meta['size']}"
        if sha256_file(path) != meta["sha256"]:
            return f"{name} does not match its sha256"
    return None
