"""What a user can get wrong, and a Ctrl-C while starting up: the one exception type that main.py turns into one
line on stderr and exit 2; the SIGINT handler that keeps an early Ctrl-C from being lost.

Kept apart from everything heavy (no torch, no pandas), so that main.py can report a bad flag or a missing
data folder before it spends seconds importing PyTorch.
"""
import errno
import signal
import threading


class UserError(Exception):
    """A problem the user can fix; main.py prints it as one line and exits non-zero."""


# Errors of the disk, not of the program: a user can fix them (one line, no traceback).
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}


# ---------------------------------------------------------------------------------------------------------------
# A Ctrl-C while starting up
# A Ctrl-C is a KeyboardInterrupt, but a library can turn it into another error and go on: pybind11 makes any
# exception raised while a C extension initialises an ImportError, and PyTorch imports Triton under `except
# ImportError` (torch._dynamo, imported by the first optimizer). A Ctrl-C in that instant of start-up vanished and
# the run trained to its end. So while main.py runs, each SIGINT is noted as it is raised, and one noted but not
# acted on is raised again where it can have been lost (raise_lost_interrupt).

_SIGINTS = []


def _note_and_interrupt(signum, frame):
    _SIGINTS.append(signum)
    raise KeyboardInterrupt


def note_interrupts():
    """Installs the noting SIGINT handler; returns the one to restore (None: left alone, as where SIGINT is
    ignored, such as a job started with & from a script, or where another handler is in place)."""
    _SIGINTS.clear()
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return None
    return signal.signal(signal.SIGINT, _note_and_interrupt)


def raise_lost_interrupt():
    """Raises KeyboardInterrupt if a Ctrl-C was noted and a library swallowed it."""
    if _SIGINTS:
        raise KeyboardInterrupt
