"""The one exception type for problems the user causes and can fix.

``UserError`` is raised for a bad option value, a missing or damaged file the user handed in, an unreachable model,
a run directory that cannot be used: the CLI prints its message as one line and exits with code 2. Every other
exception is a bug in vismech or a library and keeps its traceback (``vismech --debug`` shows the traceback of user
errors too). It subclasses ``ValueError`` so that Python callers that caught ``ValueError`` keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input; its message says what was wrong and what would be valid."""
