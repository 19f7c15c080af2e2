"""User-facing errors: the CLI prints these as one line, without a traceback."""

from __future__ import annotations

import argparse
import errno
import sys
from typing import Sequence


class UserError(Exception):
    """Bad input or an impossible setting; the message names what is wrong."""


class ConfigError(UserError):
    """A configuration that cannot work (names the setting at fault)."""


class DataError(UserError):
    """Malformed or missing input data (names the file and, where known, the line)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete or does not match the model."""


class CommandLineParser(argparse.ArgumentParser):
    """argparse for every command: a bad or missing flag is a ConfigError (one line naming it,
    exit status 2, from run_user_main), not argparse's usage block. Subparsers inherit it."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")


# Failures of the machine around us rather than of our code: the disk is full or read-only, a
# path is a directory where a file is wanted, permission is missing. One line, like a UserError.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR,
                      errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EFBIG, errno.EIO, errno.ELOOP}


def run_user_main(fn, argv: Sequence[str], prog: str) -> int:
    """Call a command's main; user errors (and a full or read-only disk) become one line on
    stderr and exit status 2. A reader that closed our stdout (`| head`) ends the command
    quietly with the shell's status for SIGPIPE."""
    try:
        rc = fn(list(argv))
    except UserError as e:
        print(f"{prog}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"{prog}: error: {one_line(f'{e.strerror or e}{where}')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return 141
    return int(rc or 0)


def one_line(text: str) -> str:
    """Messages may quote user data (a path with a newline): keep them on one line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _silence_stdout() -> None:
    """After EPIPE, Python's exit flush would raise again; point stdout at /dev/null."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
