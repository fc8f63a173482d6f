"""Who else on this host could change, or read, the files that decide trust.

The trust policy is the root of trust and a private key signs for a person: if
another user can write either (or replace it, through a folder they can write),
every verification on the host means nothing. So a policy or a private key that
group or others can write is refused before it is read, as OpenSSH refuses a
world-writable ``authorized_keys``. A private key or passphrase that others can
only *read* is a leak that has already happened, not one airpack can undo:
that is a warning, and the command goes on.

Only the mode bits are checked (not the owner), and only the file and the
folder that holds it. On a system without POSIX modes nothing is checked.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from .errors import UsageError

_SHARED_WRITE = stat.S_IWGRP | stat.S_IWOTH
_SHARED_READ = stat.S_IRGRP | stat.S_IROTH


def _who(mode: int, group_bit: int, other_bit: int) -> str:
    both = [w for w, bit in (("group", group_bit), ("others", other_bit)) if mode & bit]
    return " and ".join(both)


def refuse_shared_write(path: Path, *, what: str, error: type[UsageError], display: str | None = None) -> None:
    """Raise ``error`` (exit 2) when group or others can write ``path``, or replace it through its folder.

    A folder with the sticky bit (``/tmp``) lets no one rename or remove a file
    they do not own, so it passes. A missing file raises ``FileNotFoundError``
    for the caller to name; a symbolic link is left to the caller's no-follow
    read, which refuses it.
    """
    if os.name != "posix":
        return
    shown = display or str(path)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return
    if st.st_mode & _SHARED_WRITE:
        who = _who(st.st_mode, stat.S_IWGRP, stat.S_IWOTH)
        raise error(
            f"{what} {shown} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}): "
            f"anyone who can write it decides what this host trusts; refusing to use it",
            path=shown,
            hint=f"Make it writable by its owner only: `chmod go-w {shown}`.",
        )
    folder = Path(path).parent
    try:
        fst = os.stat(folder)
    except OSError:
        return  # the file itself was readable; an unreadable folder is not ours to judge here
    if fst.st_mode & _SHARED_WRITE and not fst.st_mode & stat.S_ISVTX:
        who = _who(fst.st_mode, stat.S_IWGRP, stat.S_IWOTH)
        raise error(
            f"{what} {shown} is in folder {folder}, which {who} can write (mode {stat.S_IMODE(fst.st_mode):04o}): "
            f"they could replace the file; refusing to use it",
            path=shown,
            hint=f"Run `chmod go-w {folder}`, or keep the {what} in a folder only its owner can write.",
        )


def shared_read_warning(path: Path, *, what: str, display: str | None = None) -> str | None:
    """A warning when group or others can read ``path`` (a private key, a passphrase); None when they cannot."""
    if os.name != "posix":
        return None
    shown = display or str(path)
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode) or not st.st_mode & _SHARED_READ:
        return None
    who = _who(st.st_mode, stat.S_IRGRP, stat.S_IROTH)
    return (f"{what} {shown} is readable by {who} (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"treat the key as exposed and restrict it: `chmod 600 {shown}`")


def warn_stderr(message: str) -> None:
    """The default way a warning reaches the user when the caller gives none: one line on stderr."""
    print(f"warning: {message}", file=sys.stderr)
