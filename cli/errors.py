"""The one-line errors of the `tsn` command for OS errors that are the user's to fix."""

from __future__ import annotations

import errno

# errno -> the text of the one-line error (None: the error's own).
USER_OS_ERRORS = {errno.ENOSPC: None, errno.EDQUOT: None, errno.EROFS: None, errno.EACCES: None,
                  errno.EPERM: None, errno.ENOTDIR: None, errno.ELOOP: "a symlink loop",
                  errno.EEXIST: "exists but is not a directory (a file, or a broken or looping symlink)"}


def user_os_error(e: OSError) -> str | None:
    """``FILE: what is wrong`` for an error in `USER_OS_ERRORS` (a full disk, a read-only file
    system, a file or a looping symlink where a directory goes), else None: a bug, not the user's."""
    if e.errno not in USER_OS_ERRORS:
        return None
    where = f"{e.filename}: " if e.filename and str(e.filename) not in (e.strerror or "") else ""
    return f"{where}{USER_OS_ERRORS[e.errno] or e.strerror or e}"
