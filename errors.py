"""What a user can get wrong: the one exception type that main.py turns into one line on stderr and exit 2.

Kept apart from everything heavy (no torch, no pandas), so that main.py can report a bad flag or a missing
data folder before it spends seconds importing PyTorch.
"""
import errno


class UserError(Exception):
    """A problem the user can fix; main.py prints it as one line and exits non-zero."""


# Errors of the disk, not of the program: a user can fix them (one line, no traceback).
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}
