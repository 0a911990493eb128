"""The base of the graph passes' errors (a CPMError: commands report it in one line)."""

from ..runtime.errors import CPMError


class OptimizeError(CPMError):
    """A graph variant, rewrite or TensorRT plan that cannot be built as asked."""
