"""Carry an experiment grid's unfinished cells from one sitting (or machine) to the next.

A thin command line (`dnq_jax/cli/grid.py`) over `dnq_jax/grid/park.py` (what is packed, and
when): `save` packs each
unfinished cell of the grid in WORKDIR (and one finished donor per warm-up no unfinished cell
carries) into `experiments/parked/<name>/<cell>.tar.gz`, to be committed; `restore` unpacks
them into a workdir that does not hold the cell yet, where the grid resumes it. The
experiment scripts restore before they run (experiments/common.sh).

  python experiments/park.py save workdirs/dnq_table dnq_table
  python experiments/park.py restore workdirs/dnq_table dnq_table
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dnq_jax.cli.grid import park_main  # noqa: E402
from dnq_jax.grid.park import restore, save  # noqa: E402, F401  (the script's own names)


def main(argv: list[str] | None = None) -> int:
    """`save|restore WORKDIR NAME` with experiments/parked/NAME/ as the parked folder."""
    return park_main(argv, ROOT / "experiments" / "parked", __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
