"""One line for an error the user can cause: ``error: <what> <where> <fix>``, exit status 2.

The commands (``lowrank-train``, ``lowrank-memory``, ``lowrank-analyze``,
``lowrank-eval``) print a problem with their input as this one line on stderr
instead of a traceback: a bad argument or config value, a file that is missing,
unreadable or not what it should be, a directory that cannot be written
(:func:`writable_dir`), and every ``OSError`` (:func:`describe_os_error` says
what the operating system refused, on which path, and what to do).

>>> import errno
>>> describe_os_error(PermissionError(errno.EACCES, "Permission denied", "/data/x"))
"'/data/x': permission denied; fix its permissions or choose another place"
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["EXIT_USAGE", "OneLineArgumentParser", "UserInputError", "describe_os_error",
           "first_line", "print_error", "writable_dir"]

#: the exit status of every command for bad input
EXIT_USAGE = 2

#: what to do about an ``OSError``, by errno (``{other}``: what else to give)
_FIXES = {
    errno.EACCES: "fix its permissions or choose {other}",
    errno.EPERM: "the system does not allow it there; choose {other}",
    errno.EROFS: "the file system is read-only; choose {other}",
    errno.ENOSPC: "the disk is full; free space or choose {other}",
    errno.EDQUOT: "the disk quota is used up; free space or choose {other}",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose {other}",
    errno.EISDIR: "it is a directory; give a file",
    errno.EEXIST: "something else is in the way; remove it or choose {other}",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
}
_DEFAULT_FIX = "check the path and its permissions"


def _fix(err: OSError, other: str) -> str:
    return _FIXES.get(err.errno or 0, _DEFAULT_FIX).format(other=other)


class UserInputError(ValueError):
    """A problem with the user's input; ``str(err)`` is one line naming it and the fix."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one ``error:`` line (no usage block).

    >>> p = OneLineArgumentParser(prog="tool")
    >>> _ = p.add_argument("--n", type=int)
    >>> try:
    ...     p.parse_args(["--n", "x"])
    ... except SystemExit as e:
    ...     print(e.code)
    2
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"error: {message}; see {self.prog} --help\n")


def first_line(text: object) -> str:
    """The first non-empty line of ``str(text)`` (``"unknown error"`` for none).

    >>> first_line("\\n  bad value\\n  more detail")
    'bad value'
    """
    lines = [x.strip() for x in str(text).strip().splitlines() if x.strip()]
    return lines[0] if lines else "unknown error"


def print_error(message: object) -> int:
    """Print ``error: <first line of message>`` on stderr; return :data:`EXIT_USAGE`."""
    print(f"error: {first_line(message)}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def describe_os_error(err: OSError, other: str = "another place") -> str:
    """``'<path>': <what the system said>; <what to do>`` (one line).

    ``other`` is what the fix suggests instead (``"another run_dir"``).
    """
    what = (err.strerror or type(err).__name__).lower()
    path = err.filename if err.filename is not None else ""
    fix = _fix(err, other)
    where = f"{str(path)!r}: " if path != "" else ""
    if err.filename2 is not None:
        where = f"{str(path)!r} -> {str(err.filename2)!r}: "
    return f"{where}{what}; {fix}"


def writable_dir(path: str | os.PathLike[str], name: str) -> Path:
    """Create the directory ``path`` if needed and check that a file can be written in it.

    Args:
      path: the directory.
      name: the parameter that gave it (``run_dir``, ``--out``), named in the error.

    Returns:
      ``Path(path)``.

    Raises:
      UserInputError: ``path`` is a file, or cannot be created or written (a
        read-only file system, missing permissions, a file in the way).
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserInputError(f"{name} {str(p)!r} is a file, not a directory; give a directory "
                             f"for {name}")
    existed = p.is_dir()
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=p, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        what = (err.strerror or type(err).__name__).lower()
        other = err.filename is not None and Path(os.fspath(err.filename)) not in (p, *p.parents)
        at = f" at {str(err.filename)!r}" if other else ""
        raise UserInputError(f"{name} {str(p)!r} cannot be {'written' if existed else 'created'}"
                             f" ({what}{at}); {_fix(err, f'another {name}')}") from err
    return p
