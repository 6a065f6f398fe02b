"""One writer at a time: an exclusive lock file beside what is being written (a cache, a run folder, a probe run).

The lock is `flock` on `<target>.lock`, held for as long as the writer works and released by the kernel when
its process dies, so a lock left by a killed process is taken over by the next writer without any clean-up.
A second writer does not wait: it stops with one line that names the holder (process, host, start time),
before it has touched anything. The lock file is removed by its holder on release; a writer that opened
the file just before that re-checks, after locking, that the path still names the file it locked.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from common.errors import MedfmError

LOCK_SUFFIX = ".lock"


def lock_path(target: Path) -> Path:
    return Path(target).with_name(Path(target).name + LOCK_SUFFIX)


class FileLock:
    """An exclusive lock on `<target>.lock`; `release()` (or leaving the `with` block) frees it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd < 0:
            return
        try:
            if _same_file(self.path, self._fd):
                self.path.unlink()
        finally:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = -1

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(target: Path, what: str) -> FileLock:
    """The exclusive lock of `target`, or a MedfmError naming the process that holds it.

    `what` names the work for the message, e.g. "the cache /x/demo-ab12.h5".
    """
    path = lock_path(target)
    while True:
        fd = _open(path, what)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            owner = _read(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise MedfmError(f"cannot lock {path}: {err.strerror}; check that its folder is writable") from None
            raise MedfmError(f"{what} is being written by {owner or 'another process'}; wait for it to finish "
                             "(or stop it), then rerun: finished work is reused, unfinished work resumes") from None
        if _same_file(path, fd):
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock: try again
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    return FileLock(path, fd)


def _open(path: Path, what: str) -> int:
    """The lock file, created with its folder when missing; a read-only or unwritable place is one line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise MedfmError(f"cannot create the lock file {path} that keeps {what} to one writer ({err.strerror}); make its folder "
                         "writable, or write elsewhere (MEDFM_OUTPUT)") from None


def holder(target: Path) -> str | None:
    """Who holds the lock of `target` now (for messages), or None when nobody does."""
    path = lock_path(target)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read(fd) or "another process"
    else:
        return None
    finally:
        os.close(fd)


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""
