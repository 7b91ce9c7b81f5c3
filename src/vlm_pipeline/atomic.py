"""Atomic file and directory replacement: a crash never leaves a half-written output that looks valid."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file in the same folder, fsync it, then rename it over ``path``."""
    write_chunks_atomic(path, [data])


def write_chunks_atomic(path: Path, chunks: Iterable[bytes]) -> None:
    """:func:`write_bytes_atomic` for data produced piece by piece (a stream of lines): never all in memory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; an output gets the mode open() would give it
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def staging_dir_for(target: Path) -> Path:
    """A fresh, empty sibling of ``target`` to build a directory in (same filesystem, so rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.parent / f".{target.name}.staging-{uuid.uuid4().hex[:8]}"
    staged.mkdir()
    return staged


def _link_or_copy(src: str, dst: str) -> None:
    # Hard links make passing a multi-GB model through a stage free; copy across filesystems.
    if os.path.exists(dst) and os.path.samefile(src, dst):  # linked by an earlier pass: already in place
        return
    if os.path.lexists(dst):
        os.unlink(dst)  # replaced, never written into: it may be a link to a file elsewhere (a DVC cache entry)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def replace_dir_atomic(staged: Path, target: Path) -> None:
    """Move the finished directory ``staged`` into place at ``target``.

    The previous ``target`` (if any) is renamed aside first and removed only after the new one is in
    place; if moving the new one in fails, the old one is renamed back. So ``target`` is either the old
    complete output or the new one, and absent only if the process is killed between the two renames.
    A ``staged`` directory that is not a sibling of ``target`` is hard-linked (or copied) next to it first.
    """
    staged, target = Path(staged).resolve(), Path(target).resolve()
    if staged == target:
        return
    if staged.parent != target.parent:
        sibling = staging_dir_for(target)
        shutil.copytree(staged, sibling, copy_function=_link_or_copy, dirs_exist_ok=True)
        staged = sibling
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    try:
        os.replace(staged, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def link_tree(src: Path, dst: Path, only: Callable[[str], bool] | None = None) -> Path:
    """Fill ``dst`` with hard links (or copies) of ``src``'s files: a cheap pass-through of a model.

    ``only(name)``, if given, picks the top-level files to link."""
    ignore = None if only is None else (lambda folder, names: [n for n in names if Path(folder) == src and not only(n)])
    shutil.copytree(src, dst, copy_function=_link_or_copy, dirs_exist_ok=True, ignore=ignore)
    return dst
