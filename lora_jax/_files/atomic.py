"""Writing files atomically: a temporary sibling, fsync, ``os.replace``, then fsync the directory.

A file written with :func:`atomic_write` is either the old file or the new
one, never half of each, even if the process is killed mid-write (what a
kill leaves is an orphaned ``.NAME.tmp-*`` sibling, never a broken ``NAME``).
:class:`StagedFiles` does the same for several files of one directory,
renamed into place in the order they were staged, so the last one can act
as the commit record of the others (the adapter formats stage the tensors
first and the config, which carries the tensors' :func:`sha256_file`, last).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

Writer = Callable[[Path], None]
"""Writes a file's contents to the path it is given (a temporary sibling of the target)."""


def fsync_dir(directory: Path) -> None:
    """``fsync`` a directory so renames inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stage_file(target: Path, write: Writer) -> Path:
    """Writes a temporary sibling of ``target`` with ``write(tmp)``, flushed and fsynced.

    Returns the temporary path; :func:`commit_file` moves it into place. On any
    error the temporary file is removed and the error re-raised; ``target`` is
    never touched.

    Example:
      >>> import tempfile
      >>> target = Path(tempfile.mkdtemp()) / "x.txt"
      >>> tmp = stage_file(target, lambda p: p.write_text("hi"))
      >>> tmp.name.startswith(".x.txt.tmp-"), target.exists()
      (True, False)
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def commit_file(tmp: Path, target: Path) -> None:
    """Atomically renames a staged file over ``target`` (``os.replace``)."""
    os.replace(tmp, target)


def atomic_write(target: Path, write: Writer) -> None:
    """Writes ``target`` atomically: stage a temporary sibling, fsync, rename, fsync the directory.

    Example:
      >>> import tempfile
      >>> p = Path(tempfile.mkdtemp()) / "x.txt"
      >>> atomic_write(p, lambda tmp: tmp.write_text("hi"))
      >>> p.read_text()
      'hi'
    """
    target = Path(target)
    with StagedFiles(target.parent) as files:
        files.stage(target.name, write)
        files.commit()


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # no such flag here
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_directory(new: Path, target: Path) -> None:
    """Puts the directory ``new`` at ``target`` in one step, removing the old ``target``.

    Where ``target`` exists it is swapped with ``new`` atomically (so a kill at
    any moment leaves either the old or the new directory at ``target``), then
    the old one is deleted. Without an atomic swap (not Linux) the old
    directory is first renamed to a hidden sibling: a kill in that instant
    leaves it there and ``target`` missing.

    Example:
      >>> import tempfile
      >>> d = Path(tempfile.mkdtemp())
      >>> (d / "out").mkdir(); _ = (d / "out" / "v").write_text("old")
      >>> (d / "new").mkdir(); _ = (d / "new" / "v").write_text("new")
      >>> replace_directory(d / "new", d / "out")
      >>> (d / "out" / "v").read_text(), sorted(p.name for p in d.iterdir())
      ('new', ['out'])
    """
    import shutil

    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new)  # now the old directory
    else:
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:12]}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old)
    fsync_dir(target.parent)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes.

    Example:
      >>> import tempfile
      >>> p = Path(tempfile.mkdtemp()) / "x"
      >>> _ = p.write_bytes(b"")
      >>> sha256_file(p)[:16]
      'e3b0c44298fc1c14'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class StagedFiles:
    """Several files of one directory, staged one by one and renamed into place in order.

    Use as a context manager: :meth:`stage` each file, then :meth:`commit`.
    If anything fails (or is interrupted) before every rename is done, the
    temporary files not yet renamed are removed on exit and the targets not
    yet renamed keep their old contents.

    Example:
      >>> import tempfile
      >>> d = Path(tempfile.mkdtemp())
      >>> with StagedFiles(d) as files:
      ...     tmp = files.stage("data.bin", lambda p: p.write_bytes(b"123"))
      ...     _ = files.stage("index.json", lambda p: p.write_text(sha256_file(tmp)[:8]))
      ...     files.commit()   # data.bin first, index.json last
      >>> sorted(p.name for p in d.iterdir()), (d / "index.json").read_text()
      (['data.bin', 'index.json'], 'a665a459')
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._staged: list[tuple[Path, Path]] = []

    def stage(self, name: str, write: Writer) -> Path:
        """Writes ``directory/name``'s new contents to a temporary sibling; returns its path."""
        target = self.directory / name
        tmp = stage_file(target, write)
        self._staged.append((tmp, target))
        return tmp

    def commit(self) -> None:
        """Renames every staged file over its target in staging order, then fsyncs the directory."""
        while self._staged:
            tmp, target = self._staged[0]
            commit_file(tmp, target)
            self._staged.pop(0)
        fsync_dir(self.directory)

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(self, *exc_info) -> None:
        for tmp, _ in self._staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._staged = []


__all__ = [
    "StagedFiles",
    "atomic_write",
    "commit_file",
    "fsync_dir",
    "replace_directory",
    "sha256_file",
    "stage_file",
]
