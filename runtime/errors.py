"""The base of every error cpm-deploy reports to a user: a command prints its message in one line,
no traceback. Each layer derives its errors from it (runtime here, serve, exporter, optimize), most
also from the builtin they refine (ValueError for bad input), so ``except ValueError`` still holds."""


class CPMError(Exception):
    """A user-facing error: its message says what went wrong and what to do."""
