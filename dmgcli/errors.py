"""The one exception type the CLI turns into a one-line message and a non-zero exit."""
import errno


class DmgError(Exception):
    """A user-facing error: bad input, a missing file, an unknown name. No traceback."""


def disk_full(exc: BaseException) -> bool:
    """Whether an error means the disk (or the user's quota) is full: the user's to fix, never a
    corrupt archive or a bug. h5py raises these as OSError with errno set, without a file name."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
