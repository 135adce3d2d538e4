"""The errors our own checks raise at the edge (bad configs, paths, data, checkpoints, requests).

The CLI turns exactly these into a one-line message and exit status 2; anything else is a bug and keeps
its traceback. Both subclass the built-in types callers already catch (ValueError, FileNotFoundError).
"""


class InputError(ValueError):
    """Bad input named in the message: an impossible config, a malformed file, an out-of-range token id."""


class MissingInputError(InputError, FileNotFoundError):
    """A path the user named does not exist or holds nothing usable."""
