"""The one exception type of :mod:`training.data`.

Every problem found in input data (a missing or truncated file, an atlas that does not
match the BOLD images, inconsistent repetition times, NaNs, an undecodable stimulus, a run
with no stimulus...) is raised as :class:`DataError`, with a message that names the file
or the value at fault.  It subclasses :class:`ValueError` so that callers that already
catch ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Input data are missing, unreadable or inconsistent.

    The message always names the file (or run, or subject) at fault and the problem.
    """
