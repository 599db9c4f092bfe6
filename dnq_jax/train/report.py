"""Deprecated: the run report is `dnq_jax.report` (a package above the trainer).

Kept only while `evaluate.py --report` (`dnq_jax/train/cli.py`) imports the report from
here; delete this module once cli.py imports `dnq_jax.report`. The measurements moved to
`dnq_jax.diagnostics.measure`.
"""

import warnings

from dnq_jax.report import ReportSettings, collect_ptq, default_bits, write_report

warnings.warn(
    "dnq_jax.train.report is deprecated: import dnq_jax.report", DeprecationWarning, stacklevel=2
)

__all__ = ["ReportSettings", "collect_ptq", "default_bits", "write_report"]
