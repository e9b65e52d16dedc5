"""The errors fastforget raises about what it was given.

A UserError means something a user gave fastforget is wrong (an argument, a file, a folder, a
class, a setting, a model, a checkpoint), and its message names it and says what was expected.
Each kind is also the built-in exception a Python caller expects (ValueError, TypeError,
FileNotFoundError), so `except ValueError` keeps working. The command line prints a UserError as
one line and exits with 2; any other exception is a bug in fastforget and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """What fastforget was given is wrong; the message says what, and what was expected."""


class InvalidValue(UserError, ValueError):
    pass


class InvalidType(UserError, TypeError):
    pass


class MissingPath(UserError, FileNotFoundError):
    pass


class UnreadableData(UserError, OSError):
    """A data file that was readable when the run started cannot be read any more."""


class Diverged(UserError, FloatingPointError):
    """Training went NaN or Inf: a matter of its settings (learning rate) or its data."""


def one_line(err: BaseException) -> str:
    """The message on one line: a multi-line one (a list of refused backends) joined with '; '."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines).replace(":;", ":") or type(err).__name__
