"""Exceptions of the batchpipe library.

``InputError`` is fatal: the whole input (file, options) is unusable and the run must stop. Its message
always names the file and, where relevant, the column and the 0-based data row, e.g.
``data/in.csv: column 'image' not found (columns: id, prompt)``.

``RowError`` is not fatal: one row cannot be turned into a request. It is counted, listed and carried into
the merged results as that row's ``error``.
"""

from __future__ import annotations


class InputError(ValueError):
    """Fatal problem with the input file or the options."""


class RowError(Exception):
    """A single row cannot be sent (empty prompt, bad image, ...). Not fatal."""

    def __init__(self, message: str, column: str | None = None):
        super().__init__(message)
        self.message = message
        self.column = column
