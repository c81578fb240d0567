"""One exception type for every data problem a user can fix.

The CLIs catch exactly this type, print its message (which always names the file, and the
line or row where there is one) and exit non-zero; anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations


class DataError(Exception):
  """Bad input or bad configuration: the message says which file/line and why."""

  def __init__(self, message: str, *, location: str | None = None):
    self.location = location
    super().__init__(f"{location}: {message}" if location else message)
