"""Locks on what several runs share (models_pth/, the demo set, the decode cache, a run folder), so that one
process at a time changes it. An advisory lock on a small lock file beside the thing: fcntl.flock on Linux and
macOS, msvcrt.locking on Windows. The operating system drops it when the process ends, however it ends, so a
killed run never leaves a folder locked.
"""
import contextlib
import os
import time

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt


class Busy(Exception):
    """The lock is held by another process (only when asked not to wait)."""


def _try_lock(fd):
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError:
        return False


def acquire(lock_path, wait=True):
    """The open lock file's descriptor, holding the lock: waits for it, or raises Busy at once when wait is False.
    Close the descriptor (release) to let the next process in."""
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    while not _try_lock(fd):
        if not wait:
            os.close(fd)
            raise Busy(lock_path)
        time.sleep(0.05)
    return fd


def release(fd):
    os.close(fd)  # closing the file drops the lock


@contextlib.contextmanager
def held(lock_path, wait=True):
    """with held(path): ... runs while no other process holds `path`'s lock."""
    fd = acquire(lock_path, wait)
    try:
        yield
    finally:
        release(fd)
