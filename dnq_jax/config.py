"""The training configuration: every key, its default, the method presets and validation.

`base_config()` holds every key the trainer reads (the README's config reference is this
file). `configs/*.py` start from it and override. `resolve` turns `method` into the ablation
switches that were left unset; `validate` checks ranges and contradictions before anything
is compiled or loaded, and raises `ConfigError` naming the key.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

# method -> (weight_noise, act_noise, swa, sam). Explicitly set switches win over the preset.
METHODS = {
    "sgd": ("none", False, False, False),
    "swa": ("none", False, True, False),
    "wqn": ("differential", False, False, False),
    "aqn": ("none", True, False, False),
    "dnq": ("differential", True, True, False),
    "naive": ("naive", True, True, False),
    "accumulate": ("accumulate", True, True, False),
    "sam": ("none", False, False, True),
}
WEIGHT_NOISE = ("none", "differential", "naive", "accumulate")
MASKS = ("uniform", "salience")
RAMPS = ("linear", "cosine", "exp")
DTYPES = ("float32", "bfloat16")
CALIBRATORS = ("minmax", "percentile", "mse")


class ConfigError(ValueError):
    """A configuration value is out of range, unknown, or contradicts another."""


def base_config() -> ml_collections.ConfigDict:
    """Every configuration key with its default (the paper protocol on ResNet-20/CIFAR-10)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Model and data.
    c.model = "resnet20"
    c.width = 1.0  # width multiplier (mobilenet_v2 only)
    c.dataset = "cifar10_jpeg"
    c.npz_path = ""  # cifar10_jpeg: '' = ../shared/data/cifar10_jpeg_q75.npz
    c.data_dir = ""  # decoded-data cache; '' = ./data_cache
    c.tfds_data_dir = ""  # TFDS data_dir; '' = TFDS default
    c.limit_train = 0  # use only the first N training images (0 = all)
    c.limit_test = 0
    c.dtype = "float32"  # compute dtype: float32 | bfloat16
    # Optimisation.
    c.num_epochs = 400
    c.steps_per_epoch = 0  # 0 = num_train // batch_size
    c.batch_size = 64
    c.learning_rate = 0.015
    c.warmup_epochs = 0
    c.momentum = 0.9
    c.nesterov = True
    c.weight_decay = 1e-3
    c.label_smoothing = 0.1
    # Method: a preset for the switches below (sgd|swa|wqn|aqn|dnq|naive|accumulate|sam).
    c.method = "dnq"
    c.weight_noise = placeholder(str)  # none|differential|naive|accumulate (None: from method)
    c.act_noise = placeholder(bool)
    c.swa = placeholder(bool)
    c.sam = placeholder(bool)
    c.sam_rho = 0.05
    # Noise model (DESIGN section 3).
    c.noise_start_epoch = 200
    c.ramp_epochs = 80
    c.ramp = "linear"
    c.lambda_max = 1.0
    c.rho = 0.5
    c.mask = "uniform"
    c.tau = 1.0
    c.ema_decay = 0.9
    c.w_bits = 2  # bit-widths of the modelled quantizer
    c.a_bits = 4
    c.keep_ends_8bit = True
    c.n_calib = 100
    c.calib_seed = 0
    # SWA.
    c.swa_start_epoch = 300
    c.swa_lr = placeholder(float)  # None: keep the cosine schedule
    c.bn_recalibration = True
    # Evaluation.
    c.eval_every_epochs = 1
    c.eval_batch_size = 500
    c.eval_bits = "w8a8,w4a4,w2a4,w2a2"
    c.eval_calibrator = "minmax"
    # Runtime.
    c.num_devices = 0  # 0 = all local devices (all hosts after jax.distributed.initialize())
    c.chunk_steps = 0  # steps per jitted call; 0 = whole epoch on GPU/TPU, 1 on CPU
    c.prng_impl = "threefry2x32"  # or 'rbg' / 'unsafe_rbg' (XLA's RngBitGenerator)
    c.ckpt_every_epochs = 10
    c.keep_checkpoints = 2
    c.progress = True
    c.rollback_on_nan = False  # on NaN: restore the last checkpoint and halve lambda_max
    # Testing aid: poison the input at this global step (-1 = never). Only the first pass over
    # the step is poisoned (while lam_scale == 1), so a rollback replays it clean.
    c.debug_nan_step = -1
    return c


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with the switches left unset filled from `method`."""
    if config.method not in METHODS:
        raise ConfigError(f"method: unknown {config.method!r}; choose from {sorted(METHODS)}")
    c = ml_collections.ConfigDict(config.to_dict())
    wn, an, swa, sam = METHODS[c.method]
    with c.unlocked():
        if c.weight_noise is None:
            c.weight_noise = wn
        if c.act_noise is None:
            c.act_noise = an
        if c.swa is None:
            c.swa = swa
        if c.sam is None:
            c.sam = sam
    return c


def uses_noise(config: ml_collections.ConfigDict) -> bool:
    return config.weight_noise != "none" or bool(config.act_noise)


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raise ConfigError naming the key for anything out of range or contradictory.

    Expects a resolved config. `num_devices`, if given, checks the batch divides evenly.
    """
    # Imported here so that loading a config file stays free of JAX and Flax.
    from dnq_jax import data, models

    c = config
    _check(c.model in models.names(), "model", f"unknown {c.model!r}; choose from {models.names()}")
    _check(c.dataset in data.NAMES, "dataset", f"unknown {c.dataset!r}; choose from {data.NAMES}")
    for key in ("limit_train", "limit_test", "num_devices"):
        _check(c[key] >= 0, key, f"must be >= 0 (0 = all), got {c[key]}")
    _check(c.width > 0, "width", f"must be positive, got {c.width}")
    _check(c.num_epochs >= 1, "num_epochs", f"must be positive, got {c.num_epochs}")
    _check(c.batch_size >= 1, "batch_size", f"must be positive, got {c.batch_size}")
    _check(c.steps_per_epoch >= 0, "steps_per_epoch", "must be >= 0 (0 = derived)")
    _check(c.learning_rate > 0, "learning_rate", f"must be positive, got {c.learning_rate}")
    _check(0 <= c.momentum < 1, "momentum", f"must be in [0, 1), got {c.momentum}")
    _check(c.weight_decay >= 0, "weight_decay", "must be >= 0")
    _check(0 <= c.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
    _check(0 <= c.warmup_epochs < c.num_epochs, "warmup_epochs", "must be in [0, num_epochs)")
    for key in ("w_bits", "a_bits"):
        bits = c[key]
        _check(isinstance(bits, int) and 2 <= bits <= 16, key, f"must be 2..16, got {bits}")
    _check(0 <= c.rho <= 1, "rho", f"must be in [0, 1], got {c.rho}")
    _check(c.tau > 0, "tau", f"must be positive, got {c.tau}")
    _check(0 <= c.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {c.ema_decay}")
    _check(c.lambda_max >= 0, "lambda_max", f"must be >= 0, got {c.lambda_max}")
    _check(c.ramp in RAMPS, "ramp", f"unknown {c.ramp!r}; choose from {RAMPS}")
    _check(c.mask in MASKS, "mask", f"unknown {c.mask!r}; choose from {MASKS}")
    _check(c.dtype in DTYPES, "dtype", f"unknown {c.dtype!r}; choose from {DTYPES}")
    _check(
        c.weight_noise in WEIGHT_NOISE,
        "weight_noise",
        f"unknown {c.weight_noise!r}; choose from {WEIGHT_NOISE}",
    )
    _check(
        c.eval_calibrator in CALIBRATORS,
        "eval_calibrator",
        f"unknown {c.eval_calibrator!r}; choose from {CALIBRATORS}",
    )
    _check(c.n_calib >= 1, "n_calib", f"must be positive, got {c.n_calib}")
    _check(c.eval_batch_size >= 1, "eval_batch_size", "must be positive")
    _check(c.eval_every_epochs >= 1, "eval_every_epochs", "must be positive")
    _check(c.ckpt_every_epochs >= 1, "ckpt_every_epochs", "must be positive")
    _check(c.keep_checkpoints >= 1, "keep_checkpoints", "must be positive")
    _check(c.chunk_steps >= 0, "chunk_steps", "must be >= 0 (0 = automatic)")
    _check(c.prng_impl in ("threefry2x32", "rbg", "unsafe_rbg"), "prng_impl", "unknown impl")
    parse_bits(c.eval_bits)
    if uses_noise(c):
        _check(
            0 <= c.noise_start_epoch < c.num_epochs,
            "noise_start_epoch",
            f"must be in [0, num_epochs={c.num_epochs}) when noise is on, got "
            f"{c.noise_start_epoch}",
        )
    if c.swa:
        _check(
            0 <= c.swa_start_epoch < c.num_epochs,
            "swa_start_epoch",
            f"the SWA window must lie inside the run: need 0 <= swa_start_epoch < "
            f"num_epochs={c.num_epochs}, got {c.swa_start_epoch}",
        )
    _check(
        not (c.sam and c.weight_noise == "accumulate"),
        "sam",
        "SAM and weight_noise='accumulate' both rewrite the params; use one",
    )
    if c.swa_lr is not None:
        _check(c.swa, "swa_lr", "is set but SWA is off (method/swa)")
        _check(c.swa_lr > 0, "swa_lr", f"must be positive, got {c.swa_lr}")
    if c.sam:
        _check(c.sam_rho > 0, "sam_rho", f"must be positive when SAM is on, got {c.sam_rho}")
    _check(c.debug_nan_step >= -1, "debug_nan_step", "must be a step >= 0, or -1 (off)")
    if num_devices is not None:
        _check(
            c.batch_size % num_devices == 0,
            "batch_size",
            f"{c.batch_size} is not divisible by the {num_devices} devices in use",
        )


# Keys a resumed run may change: they alter how a run is watched, stored or placed, not the
# sequence of states it computes.
RESUME_FREE = frozenset({
    "progress", "eval_every_epochs", "eval_batch_size", "eval_bits", "eval_calibrator",
    "ckpt_every_epochs", "keep_checkpoints", "num_devices", "chunk_steps", "data_dir",
    "tfds_data_dir", "npz_path", "rollback_on_nan", "debug_nan_step",
})  # fmt: skip


def resume_conflicts(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """Keys whose value in `config` differs from the `saved` (config.json) run it resumes."""
    new = config.to_dict()
    keys = (set(saved) | set(new)) - RESUME_FREE
    return sorted(k for k in keys if saved.get(k) != new.get(k))


def parse_bits(spec: str) -> list[tuple[int, int]]:
    """'w8a8,w4a4' -> [(8, 8), (4, 4)]; raises ConfigError on malformed or out-of-range bits."""
    out = []
    for item in [s.strip().lower() for s in spec.split(",") if s.strip()]:
        try:
            w, a = item.removeprefix("w").split("a")
            wb, ab = int(w), int(a)
        except ValueError:
            raise ConfigError(f"eval_bits: cannot read {item!r}; write e.g. 'w4a4,w2a4'") from None
        _check(2 <= wb <= 16 and 2 <= ab <= 16, "eval_bits", f"{item}: bits must be 2..16")
        out.append((wb, ab))
    return out


def split_arg(arg: str | None, presets: tuple[str, ...]) -> tuple[set[str], list[str]]:
    """Split a config-file argument such as 'smoke,model=resnet56' into presets and pairs."""
    words, pairs = set(), []
    for item in [s.strip() for s in (arg or "").split(",") if s.strip()]:
        if "=" in item:
            pairs.append(item)
        elif item in presets:
            words.add(item)
        else:
            raise ConfigError(f"config argument {item!r}: not key=value nor one of {presets}")
    return words, pairs


def apply_pairs(config: ml_collections.ConfigDict, pairs: list[str]) -> ml_collections.ConfigDict:
    """Set `key=value` items on `config`, each value parsed as the key's type."""
    for item in pairs:
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in config:
            raise ConfigError(f"{key}: unknown config key (known: {', '.join(sorted(config))})")
        current = config[key]
        try:
            if isinstance(current, bool) or value.lower() in ("true", "false"):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                config[key] = value.lower() in ("true", "1")
            elif isinstance(current, int):
                config[key] = int(value)
            elif isinstance(current, float):
                config[key] = float(value)
            else:
                config[key] = value
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{key}: cannot set {value!r}: {e}") from None
    return config
