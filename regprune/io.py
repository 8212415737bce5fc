"""Crash-safe writes and loads that never execute code from the file.

Every writer here works on a temporary file beside the target and renames it onto the target only once the
content is complete and flushed to disk, so a reader (or a run killed half-way) sees either the old file or the
complete new one, never a partial one. Loads of torch.save files use ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import torch

from .errors import UserError, first_line

__all__ = ["atomic_path", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_save", "safe_load",
           "check_checkpoint_safe"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path for a writer that needs a file name; it replaces `path` when the block succeeds.

    The temporary file lies in a private folder beside `path` (so the final rename stays on one filesystem and
    is atomic) and has the name of `path`. It is created by the writer, so it gets the permissions of an ordinary
    open(). Missing parent folders of `path` are created. If the block raises, or the writer wrote nothing, the
    folder is removed and `path` is left as it was.

    Raises:
        FileNotFoundError: the block finished without creating the temporary file.
        OSError: the folder cannot be created or the rename fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp = tmp_dir / path.name
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    # flushes a file's data or a folder's entries (the rename); not possible everywhere (e.g. folders on Windows)
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Context manager yielding a file object (opened with `mode`, "wb" or "w") whose content replaces `path`
    only when the block succeeds; see `atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so readers see either the old file or the complete new one."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text version of atomic_write_bytes (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` atomically; `obj` should pass check_checkpoint_safe."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def safe_load(path: str | os.PathLike) -> Any:
    """Load a torch.save file with weights_only=True onto the CPU (tensors come back on the CPU).

    Raises:
        UserError: the file does not exist; it holds objects other than tensors and plain data (nothing in it is
            run); it is truncated or otherwise unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"refusing to load {path}: it contains objects other than tensors and plain data "
                        f"({first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"cannot read checkpoint {path}: {first_line(e)}") from None


_SAFE_LEAVES = (type(None), bool, int, float, str, torch.Tensor, torch.Size, torch.dtype)


def check_checkpoint_safe(obj: Any, where: str = "checkpoint") -> None:
    """Check that `safe_load` could read `obj` back.

    Raises:
        TypeError: naming (by its place in `obj`, prefixed by `where`) the first value or key weights_only
            loading would reject; allowed are None, bool, int, float, str, tensors, sizes, dtypes, and lists,
            tuples and str/int-keyed dicts of them.
    """
    if isinstance(obj, _SAFE_LEAVES):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} cannot be stored in a checkpoint")
            check_checkpoint_safe(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_checkpoint_safe(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: value of type {type(obj).__module__}.{type(obj).__qualname__} cannot be stored "
                    "in a checkpoint (use tensors, numbers, strings, lists and dicts)")
