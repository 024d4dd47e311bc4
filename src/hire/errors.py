"""The errors HiRE raises for problems a user can fix (bad input, a missing file, a failed rank).

The CLI prints their message (and with ``-v`` the traceback too); any other exception, such as a
RuntimeError from inside torch, is a bug or an environment problem and keeps its traceback.
"""

from __future__ import annotations


class HireError(Exception):
    """A problem the message tells the user how to fix."""


class OverwriteError(HireError, FileExistsError):
    """A command would replace a file or directory the user has; ``--force`` allows it."""


class ConfigError(HireError, ValueError):
    """A config value (from a JSON file, flags or code) has the wrong type or is out of range; the
    message names the field. A ValueError too, so callers that catch bad values keep working."""
