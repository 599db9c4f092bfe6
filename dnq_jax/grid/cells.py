"""A grid's cells: named settings (config overrides) crossed with seeds, each checked first.

A setting is `NAME:key=value,...` (`parse_setting`); the grid key `bits=w4a4+w2a4` sets the
bit-widths its cells are evaluated at, and `recon_bits=w2a4` those of them the reconstruction
methods (AdaRound, BRECQ, QDrop; RTN keeps all of `bits`) run at: the costly half of a PTQ
table where only some columns are compared. `make_cells` crosses the settings (and `--methods`)
with the seeds and validates every cell's config before the first one trains.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_collections

from dnq_jax.errors import ConfigError
from dnq_jax.train import config as config_lib

Bits = tuple[tuple[int, int], ...]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of the grid: a setting (named overrides) at one seed, and its bit-widths."""

    setting: str
    seed: int
    config: ml_collections.ConfigDict
    bits: Bits
    overrides: str = ""
    # (method, bits) pairs: a method evaluated at fewer of `bits` than the others (the demo's
    # reconstruction, only at the DNQ targets); a method not named here gets all of `bits`.
    method_bits: tuple[tuple[str, Bits], ...] = ()

    def bits_for(self, method: str) -> Bits:
        """The bit-widths `method` evaluates the cell at."""
        only = dict(self.method_bits).get(method)
        return self.bits if only is None else tuple(b for b in self.bits if b in only)

    @property
    def name(self) -> str:
        """The cell's folder name under W/cells/: '<setting>_s<seed>'."""
        return f"{self.setting}_s{self.seed}"


def parse_setting(spec: str) -> tuple[str, str, Bits | None, Bits | None]:
    """'NAME:k=v,...,bits=w4a4+w2a4,recon_bits=w2a4' ->
    (NAME, 'k=v,...', ((4, 4), (2, 4)) or None, ((2, 4),) or None)."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not _NAME.match(name):
        raise ConfigError(f"--cell {spec!r}: name the setting with letters, digits, _ . + -")
    pairs, found = [], {"bits": None, "recon_bits": None}
    for item in [s.strip() for s in rest.split(",") if s.strip()]:
        key, _, value = item.partition("=")
        if key in found:
            found[key] = tuple(config_lib.parse_bits(value.replace("+", ",")))
        else:
            pairs.append(item)
    return name, ",".join(pairs), found["bits"], found["recon_bits"]


def _recon_only(spec_name: str, bits: Bits, recon: Bits | None) -> tuple[tuple[str, Bits], ...]:
    """`Cell.method_bits` of a cell whose reconstruction runs at `recon` (None: at all)."""
    if recon is None:
        return ()
    outside = [config_lib.bits_name(*b) for b in recon if b not in bits]
    if outside:
        raise ConfigError(
            f"--cell {spec_name}: recon_bits {', '.join(outside)} not among the cell's bits "
            f"({bits_text(bits)})"
        )
    return tuple((m, recon) for m in config_lib.ptq_methods() if m != "rtn")


def load_config_file(spec: str) -> tuple[Callable[[str], ml_collections.ConfigDict], str]:
    """'configs/resnet.py:smoke,k=v' -> (the file's get_config, 'smoke,k=v')."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"--config: no config file {path!r}")
    module_spec = importlib.util.spec_from_file_location("dnq_grid_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config, arg


def make_cells(
    get_config: Callable[[str], ml_collections.ConfigDict],
    config_arg: str,
    seeds: Iterable[int],
    methods: Iterable[str] = (),
    settings: Iterable[str] = (),
    bits: str = "",
) -> list[Cell]:
    """The cells, seed-major (every setting at the first seed before any at the second)."""
    methods, parsed = list(methods), [parse_setting(s) for s in settings]
    if methods and parsed:
        parsed = [
            (f"{m}-{n}", f"method={m},{p}".rstrip(","), b, r)
            for m in methods
            for n, p, b, r in parsed
        ]
    elif methods:
        parsed = [(m, f"method={m}", None, None) for m in methods]
    if not parsed:
        raise ConfigError("the grid has no cells: give --methods and/or --cell NAME:overrides")
    cells = []
    for seed in seeds:
        for name, pairs, own_bits, recon in parsed:
            arg = ",".join(s for s in (config_arg, pairs, f"seed={seed}") if s)
            c = get_config(arg)
            cell_bits = own_bits or tuple(config_lib.parse_bits(bits or c.eval.bits))
            # The trainer's own evaluation (results.json) is then the RTN one the grid needs.
            c.eval.bits = bits_text(cell_bits)
            config_lib.validate(c)  # every cell is checked before the first one trains
            only = _recon_only(name, cell_bits, recon)
            cells.append(Cell(name, int(seed), c, cell_bits, pairs, only))
    names = [c.name for c in cells]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"the grid names cells {dup} twice: give each setting its own name")
    return cells


def bits_text(bits: Bits) -> str:
    """((4, 4), (2, 4)) -> 'w4a4,w2a4' (the form of `eval.bits`)."""
    return ",".join(config_lib.bits_name(*b) for b in bits)
