"""The base of the exporter's errors (a CPMError: commands report it in one line)."""

from ..runtime.errors import CPMError


class ExportError(CPMError):
    """A checkpoint, configuration or export that cannot go ahead as asked."""


class ParityError(ExportError, RuntimeError):
    """A graph missed its gate against the reference; ``report`` holds the cases."""

    def __init__(self, report: dict, what: str | None = None):
        self.report = report
        bad = [c for c in report["cases"] if not c["passed"]]
        what = what or (f"parity check failed on {len(bad)} of {len(report['cases'])} cases "
                        f"(logits max abs diff {report['logits_max_abs_diff']:.3g}, atol {report['atol']}, "
                        f"rtol {report['rtol']})")
        super().__init__(f"{what}; no bundle was written")
