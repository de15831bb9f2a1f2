"""One error for a write the filesystem refused (full disk, quota, I/O error), naming the
path and the free space, so a run stops in seconds with one line instead of hanging or
logging and carrying on. Checkpoints, event files, metrics.jsonl and sample PNGs all
raise it; `launch.py` turns it into exit status `exit_code`.
"""
from __future__ import annotations

import errno
import os
import shutil

# Errors that retrying or carrying on will not fix.
DISK_ERRNOS = (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS, errno.EFBIG)
_DISK_TEXTS = ("no space left", "disk quota", "input/output error", "read-only file system",
               "file too large")


class WriteFailed(OSError):
    """Writing `path` failed for lack of space or an I/O error; the message says both."""
    exit_code = 4

    def __str__(self) -> str:
        return str(self.strerror)


def free_space(path: str) -> str:
    """'1.2 MB free of 5.0 MB' for the filesystem holding `path` (or its nearest parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return "free space unknown"
    return f"{usage.free / 1e6:.1f} MB free of {usage.total / 1e6:.1f} MB"


def disk_errno(exc: BaseException) -> int | None:
    """The errno of a disk-level failure anywhere in exc's chain (orbax and tensorstore
    wrap the OSError, sometimes only as text), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            return exc.errno
        text = str(exc).lower()
        for code, needle in zip(DISK_ERRNOS, _DISK_TEXTS):
            if needle in text:
                return code
        exc = exc.__cause__ or exc.__context__
    return None


def write_failed(path: str, exc: BaseException) -> WriteFailed | None:
    """A WriteFailed for `path` if exc is a disk-level failure, else None."""
    if isinstance(exc, WriteFailed):
        return exc
    code = disk_errno(exc)
    if code is None:
        return None
    return WriteFailed(code, f"writing {path} failed: {os.strerror(code)} "
                       f"({free_space(path)}); stopping. Free space or move the workdir, "
                       f"then relaunch to resume from the last checkpoint")


class guard:
    """`with guard(path): ...` turns a disk-level failure inside into WriteFailed(path)."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            return False
        err = write_failed(self.path, exc)
        if err is None or err is exc:
            return False
        raise err from exc
