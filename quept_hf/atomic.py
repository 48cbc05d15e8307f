"""Atomic writes: readers (and a run killed half-way) never see half a file or half a folder."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths in one step


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """``write(tmp)`` writes a temporary file in the same folder, which is then renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result should be readable like any file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in 1 MiB chunks (safetensors has no checksum of its own)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def staged_folder(out_dir: str | os.PathLike, carry: Callable[[str], bool] | None = None) -> Iterator[str]:
    """Yield an empty staging folder next to ``out_dir``; when the block succeeds it replaces ``out_dir``.

    ``out_dir`` is thus either wholly old or wholly new, whatever kills the process when: files a save writes in
    several steps (base weights, then adapter) can no longer mix two saves, and files of the old save that the new
    one does not rewrite (other shards) are gone. Entries of the old ``out_dir`` whose names ``carry`` accepts
    (e.g. a tokenizer saved next to the model) are copied into the staging folder first, so the new content
    overwrites them. On Linux the swap is one ``renameat2(RENAME_EXCHANGE)``; elsewhere the old folder is moved
    aside and the staging folder moved in (two renames). On an error ``out_dir`` is left as it was.
    """
    out_dir = os.path.realpath(out_dir)  # a link to a folder: replace the folder, keep the link
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"{out_dir!r} is a file, not a folder: save into a folder")
    parent, name = os.path.dirname(out_dir), os.path.basename(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.", dir=parent)
    try:
        if carry is not None and os.path.isdir(out_dir):
            _copy_entries(out_dir, staging, carry)
        yield staging
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the result should be readable like any folder
        _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _copy_entries(source: str, target: str, carry: Callable[[str], bool]) -> None:
    """Copy the entries of ``source`` that ``carry`` accepts (files in folders hard-linked where possible)."""
    for entry in os.scandir(source):
        if not carry(entry.name):
            continue
        destination = os.path.join(target, entry.name)
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, destination, symlinks=True, copy_function=_link_or_copy)
        else:
            shutil.copy2(entry.path, destination, follow_symlinks=False)  # may be rewritten: never a link


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _swap_in(staging: str, out_dir: str) -> None:
    """Make ``staging`` the content of ``out_dir``; ``staging`` is left holding the old one (or nothing)."""
    if not os.path.exists(out_dir):
        os.replace(staging, out_dir)
        os.makedirs(staging)  # the caller removes it
        return
    if _exchange(staging, out_dir):
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old.", dir=os.path.dirname(out_dir))
    os.replace(out_dir, os.path.join(old, "previous"))
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0
