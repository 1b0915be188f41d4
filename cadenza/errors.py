"""The one exception type for mistakes a user can make and fix.

The CLI prints its message (no traceback) and exits with status 2; the Python API lets it propagate.
"""


class CadenzaError(Exception):
    """A problem the user can fix: the message names the problem and the fix."""
