"""medit's error types: bad user input versus everything else.

:class:`UserError` is raised for input a user can fix — a file, record, field, option or
hyper-parameter — with a one-line message that names it. The CLI turns it into exit code 2 and
that line. Any other exception is a bug in medit (or in a library below it): exit code 1, a short
message and, with ``-v``, the traceback.

``UserError`` subclasses ``ValueError`` so that library callers catching ``ValueError`` keep
working; the CLI never turns a plain ``ValueError`` into a user error.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input that the user can fix; the message names the file, record, field or option."""
