"""One training run per workdir: `<workdir>/.lock`, held with fcntl.flock while the run
lives, holding "host pid" so that a refused launch can say who has it.

Two launches on one workdir used to corrupt each other (the second moved the first's
in-flight checkpoint aside as unfinished, then both trained and wrote the same steps).
The kernel releases a flock when its process dies, so a crashed run leaves no stale
lock on a local filesystem. Where flock is not available (some network filesystems)
or a lock is still held but its content names a process of this host that is no
longer alive, the lock is taken over with a warning. Only process 0 of a multi-host
job takes it: the others share process 0's workdir.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class WorkdirLocked(RuntimeError):
    """Another live run holds the workdir."""
    exit_code = 5


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(path: str) -> tuple[str, int] | None:
    try:
        with open(path, encoding="utf-8") as f:
            host, pid = f.read().split()[:2]
        return host, int(pid)
    except (OSError, ValueError):
        return None


class WorkdirLock:
    """`with WorkdirLock(workdir):` or acquire()/release(); refuses a second holder."""

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited (PEP 446)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _holder(self.path)
                me = socket.gethostname()
                if holder is not None and holder[0] == me and not _alive(holder[1]):
                    log.warning("taking over %s: its holder, pid %d on %s, is not running",
                                self.path, holder[1], me)
                else:
                    os.close(fd)
                    who = (f"pid {holder[1]} on host {holder[0]}" if holder
                           else "another process")
                    raise WorkdirLocked(
                        f"workdir {os.path.dirname(self.path)} is in use by {who} "
                        f"(lock {self.path}); refusing a second run on it. Stop that run, "
                        f"or use another --workdir") from None
            elif e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                holder = _holder(self.path)
                if holder is not None and holder != (socket.gethostname(), os.getpid()) and (
                        holder[0] != socket.gethostname() or _alive(holder[1])):
                    os.close(fd)
                    raise WorkdirLocked(
                        f"workdir {os.path.dirname(self.path)} is in use by pid {holder[1]} "
                        f"on host {holder[0]} (lock {self.path}; this filesystem has no "
                        f"flock, so a crashed run's lock must be removed by hand)") from None
            else:
                os.close(fd)
                raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} {os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty lock file names nobody
        except OSError:
            pass
        os.close(fd)  # releases the flock

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
