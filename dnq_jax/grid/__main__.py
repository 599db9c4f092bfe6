"""`python -m dnq_jax.grid ...`: the grid's command line (`cli.py`)."""

from dnq_jax.grid.cli import main

raise SystemExit(main())
