"""An experiment grid as one command: every (setting, seed) cell trained, PTQ-evaluated, summed up.

  python -m dnq_jax.cli.grid --config configs/resnet.py:smoke --methods sgd,dnq \
      --seeds 0,1,2 --ptq rtn,qdrop --ptq-iters 50 --bits w4a4,w2a4 --workdir W
  python -m dnq_jax.cli.grid --config configs/resnet.py:fast --seeds 0,1 --workdir W \
      --cell sgd:method=sgd,bits=w4a4+w2a4 \
      --cell dnq_w4a4:method=dnq,noise.w_bits=4,noise.a_bits=4,bits=w4a4

(also installed as `dnq-grid`). A setting is a name and config overrides (`--cell
NAME:key=value,...`, repeatable; `--methods a,b` is short for `--cell a:method=a --cell
b:method=b`; given both, every method is crossed with every setting, named METHOD-SETTING).
The grid key `bits=w4a4+w2a4` sets the cell's evaluated bit-widths (default `--bits`, else the
config's `eval.bits`); FP32 is always measured. Cell (setting, seed) trains in
`W/cells/<setting>_s<seed>/` with the config `--config` gives plus the overrides plus
`seed=<seed>`, and is evaluated with each `--ptq` method into `ptq_<method>.json` there.

One process: each distinct dataset is loaded once and handed to every cell that uses it, and
the persistent compilation cache (`W/.jax_cache`) turns a step already compiled for an earlier
cell (same shapes and settings, another seed) into a load. It resumes: a cell with
results.json is not trained again, an interrupted one resumes from its checkpoint (the
trainer's own rule), and a PTQ result already in `ptq_<method>.json` with the same settings
is not recomputed. After each cell, `W/grid.json`, `W/grid.md` and `W/grid.png` are
rewritten: mean ± sample std over seeds per (setting, PTQ method, precision), as a table and
as bars, and one row per finished cell.

A grid can also span machines whose cell folders are gone: `--include OLD/grid.json`
(repeatable) takes the finished cells of an earlier grid of the same `--config` and PTQ
settings as finished here (not trained again; their rows are marked as included), so seeds run
elsewhere join one mean ± std; its cells of settings this grid does not have are reported
too, so a grid run for a few settings keeps the others' rows.

Cells that differ only in `noise.*` keys (not `noise.start_epoch`) and `swa.bn_recalibration`
share their warm-up, the epochs before the noise stage, bit for bit: a cell not started yet
begins from the state another cell kept at the noise stage's start
(`W/cells/<cell>/noise_start/`; `fork.py`) and trains only from there (`--no-shared-warmup`
trains every warm-up).

The modules: `cells.py` (settings, seeds, config files), `include.py` (earlier grids),
`run.py` (train, evaluate, report each cell), `report.py` (grid.json and grid.md), `fork.py`
(shared warm-ups), `park.py` (unfinished cells carried between machines), `demo.py` (`make
demo`: a grid of one SGD and one DNQ model). The grid sits above the trainer
(`dnq_jax.train`), which never imports it; its command lines are `dnq_jax.cli.grid`.
"""

from dnq_jax.grid.cells import Cell, load_config_file, make_cells, parse_setting
from dnq_jax.grid.include import load_included
from dnq_jax.grid.run import collect, enable_compile_cache, evaluate_cell, run_grid

__all__ = [
    "Cell",
    "collect",
    "enable_compile_cache",
    "evaluate_cell",
    "load_config_file",
    "load_included",
    "make_cells",
    "parse_setting",
    "run_grid",
]
