"""The one exception type for bad input from the user: flags, configs, records, files.

Every job's CLI answers an `InputError` (found also inside Ray's task and Train wrappers)
with one line naming the flag, file or row, and exit status 2. Anything else is a bug of
ours or of a dependency: it keeps its traceback and exits 1. `InputError` subclasses
`ValueError`, so callers' ``except ValueError`` still catch it.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user; the message names the flag, file, line or row."""
