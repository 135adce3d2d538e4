"""The errors our own checks raise at the edge (bad configs, paths, data, checkpoints, requests).

The CLI turns exactly these into a one-line message and exit status 2; anything else is a bug and keeps
its traceback. Each also subclasses the built-in type callers already catch (ValueError, FileNotFoundError,
OSError, FileExistsError), so `except ValueError` around a config still works.
"""


class InputError(ValueError):
    """Bad input named in the message: an impossible config, a malformed file, an out-of-range token id."""


class MissingInputError(InputError, FileNotFoundError):
    """A path the user named does not exist or holds nothing usable."""


class UnreadableInputError(InputError, OSError):
    """A path the user named exists but cannot be read (permissions, an I/O error)."""


class OccupiedPathError(InputError, FileExistsError):
    """A path the user named for output already holds something that would be overwritten."""
