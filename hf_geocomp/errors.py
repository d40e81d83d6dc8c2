"""User-facing errors.

Every mistake a user can make (a bad name, an empty file, an impossible budget) raises
:class:`GeoCompError` with one sentence that names the thing and says what is allowed.
The CLI prints that sentence and exits non-zero, without a traceback.
"""


class GeoCompError(ValueError):
    """A problem with the user's input, described in one sentence."""
