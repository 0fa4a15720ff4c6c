"""Owner-only (0600) files: keys, identities, the directory database, audit logs, status files.

One writer for every secret the relay keeps on disk, so the rule (created with
the final mode, never wider for a moment; replaced atomically so a reader or a
crash never sees half a file) lives in one place.
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE = 0o600


def write_private(path: os.PathLike[str] | str, data: bytes | str, *, atomic: bool = True, mode: int = PRIVATE) -> None:
    """Write `data` to `path`, readable by the owner only (or `mode`); the parent directory is created.

    With `atomic` (the default) the data goes to `<path>.tmp` first and then
    replaces `path`, so readers see the old file or the new one, never a part.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    destination = target.with_name(target.name + ".tmp") if atomic else target
    fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # an older file kept its mode through O_CREAT: narrow it before writing
        with os.fdopen(fd, "wb") as out:
            fd = -1
            out.write(raw)
    finally:
        if fd >= 0:
            os.close(fd)
    if atomic:
        os.replace(destination, target)


def create_private(path: os.PathLike[str] | str, *, mode: int = PRIVATE, narrow: bool = True) -> None:
    """Create `path` empty if it does not exist, owner-only (or `mode`); with `narrow`, an existing file too.

    For files that others then open by name (SQLite, append-only logs): they are
    born with the final mode, so no reader ever finds them wider. An audit log
    keeps the mode an operator gave it (narrow=False), e.g. 0640 for a log shipper.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_APPEND, mode))
    if narrow:
        os.chmod(target, mode)
