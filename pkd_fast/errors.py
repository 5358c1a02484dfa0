"""One exception type for bad input, so the CLI can print it as a single line instead of a traceback."""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path


class PkdError(Exception):
    """A user-facing error: the message says what was wrong, where, and what was expected."""


# How torch.save reports a short write (its zip writer checks each write's position): a full disk, above all.
_SHORT_WRITE = re.compile(r"PytorchStreamWriter failed|unexpected pos|file write failed")
# OSErrors of a write that the filesystem refused (not of a file that was never there).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def write_failure(path: str | Path, err: BaseException) -> PkdError | None:
    """One line for a write under `path` that failed (a full disk, say), found in `err` or the errors it was
    raised from (`datasets` wraps it in DatasetGenerationError, torch.save in a RuntimeError), naming the
    space left there; None when `err` is no failed write."""
    cause = err
    while cause is not None and not ((isinstance(cause, OSError) and cause.errno in _WRITE_ERRNOS) or (isinstance(cause, RuntimeError) and _SHORT_WRITE.search(str(cause)))):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause).strip().splitlines()[-1]
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    return PkdError(f"{path}: cannot write ({reason}); {free / 2**20:,.1f} MiB free on its filesystem: free space "
                    "(or point --output-dir elsewhere) and run again")
