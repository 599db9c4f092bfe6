"""Facts about the backend that several floors act on, decided in one place.

XLA:CPU runs convolutions inside any loop (a rolled `lax.scan`, even unrolled) many times
slower than the same steps as straight-line code, while on GPU/TPU one scan per chunk saves a
dispatch per step. The trainer's chunks and the reconstruction's iterations both ask `scans`.
"""

from __future__ import annotations

import jax

from dnq_jax.choices import LOOPS


def scans(loop: str = "auto") -> bool:
    """Whether repeated steps run in a rolled `lax.scan` (`loop='auto'`: off CPU) or as
    straight-line code; `loop='scan'` / `'unroll'` force one."""
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
    if loop != "auto":
        return loop == "scan"
    return jax.default_backend() != "cpu"
