"""The base of serve's errors (a CPMError: commands report it in one line)."""

from ..runtime.errors import CPMError


class ServeError(CPMError):
    """Something a server or an offline job cannot do as asked."""
