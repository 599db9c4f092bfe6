"""The training configuration: groups of keys, the method presets, validation, the resume rule.

`base_config()` holds every key the trainer reads, in groups (`model`, `data`, `optim`,
`noise`, `quant`, `swa`, `eval`, `runtime`) plus the root `seed`. `build(arg)` is what
`configs/*.py` call: base config, then the method preset (`method=sgd` sets the ablation
switches), then the `smoke`/`fast` presets and `group.key=value` pairs, so the config passed
to the trainer is the one that runs and the one written to config.json.

Resume rule: the groups in `RESUME_FREE_GROUPS` (`eval`, `runtime`) say how a run is watched,
stored, placed and where its files are; they may change when a run resumes. Every other key
decides the sequence of states the run computes and must match the run's config.json.

This module imports no JAX, so loading a config file stays cheap.
"""

from __future__ import annotations

import difflib
import json

import ml_collections

from dnq_jax.choices import (
    ACT_SITES,
    AUGMENTS,
    DATA_SOURCES,
    DISTS,
    ERROR_SIGNS,
    LOOPS,
    MASKS,
    RAMPS,
    SCHEDULES,
    W_QUANTIZERS,
    WEIGHT_NOISE,
)
from dnq_jax.choices import ACTIVATION_CALIBRATORS as CALIBRATORS
from dnq_jax.errors import ConfigError
from dnq_jax.train.config_keys import (
    DTYPES,
    KEYS,
    METHODS,
    PRESETS,
    RECIPES,
    RESUME_FREE_GROUPS,
)


def ptq_methods() -> tuple[str, ...]:
    """PTQ methods the evaluation may use (`dnq_jax.ptq.METHODS`)."""
    from dnq_jax.ptq import methods  # the PTQ library, loaded only when a method is checked

    return methods.METHODS


def base_config() -> ml_collections.ConfigDict:
    """Every configuration key with its default: DNQ on ResNet-20/CIFAR-10, paper protocol."""
    c = ml_collections.ConfigDict()
    for key, default, _ in KEYS:
        group, _, leaf = key.rpartition(".")
        node = c
        if group:
            if group not in c:
                c[group] = ml_collections.ConfigDict()
            node = c[group]
        if default is None:
            node[leaf] = ml_collections.config_dict.placeholder(float)
        else:
            node[leaf] = default
    return c


def build(arg: str | None = None, **defaults) -> ml_collections.ConfigDict:
    """The locked config of a config-file argument such as 'smoke,method=sgd,optim.lr=0.1'.

    Order: base config, `defaults` (a configs/*.py file's own keys, dotted names), the
    method preset, then the presets (`smoke`, `fast`), then the `key=value` pairs.
    """
    words, pairs = split_arg(arg)
    c = base_config()
    apply_pairs(c, [f"{k}={v}" for k, v in defaults.items() if k != "method"])
    methods = [p for p in pairs if p.split("=", 1)[0].strip() == "method"]
    method = methods[-1].split("=", 1)[1].strip() if methods else defaults.get("method", "dnq")
    apply_method(c, method)
    if "smoke" in words:
        smoke(c)
    if "fast" in words:
        fast(c)
    apply_pairs(c, [p for p in pairs if p not in methods])
    c.lock()
    return c


def apply_method(c: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """Set the four ablation switches of `method` (sgd, swa, wqn, aqn, dnq, naive, ...), or
    every key of a recipe (`authors`, `lam08`, `dnq_half`)."""
    if method in RECIPES:
        return apply_pairs(c, [f"{k}={v}" for k, v in RECIPES[method].items()])
    if method not in METHODS:
        known = sorted([*METHODS, *RECIPES])
        raise ConfigError(f"method: unknown {method!r}; choose from {known}")
    c.noise.weight, c.noise.act, c.swa.enabled, c.optim.sam = METHODS[method]
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A few steps of a tiny model on synthetic data: every stage runs (warm-up, noise, SWA)."""
    c.model.name = "resnet8"
    c.data.name = "synthetic"
    c.data.limit_train, c.data.limit_test = 256, 128
    c.optim.batch_size, c.optim.steps_per_epoch, c.optim.num_epochs = 32, 4, 4
    c.optim.learning_rate = 0.05
    c.noise.start_epoch, c.noise.ramp_epochs = 1, 2
    c.swa.start_epoch = 2
    c.quant.n_calib = 16
    c.eval.batch_size, c.eval.bits = 64, "w8a8,w4a4"
    c.runtime.ckpt_every_epochs = 1
    return c


def fast(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same protocol scaled to 40 epochs (noise from 20, SWA over the last 10)."""
    c.optim.num_epochs = 40
    c.noise.start_epoch, c.noise.ramp_epochs = 20, 8
    c.swa.start_epoch = 30
    return c


def uses_noise(c: ml_collections.ConfigDict) -> bool:
    return c.noise.weight != "none" or bool(c.noise.act)


def method_name(c: ml_collections.ConfigDict) -> str:
    """The preset the config matches, or 'custom'. A recipe matches when every key that any
    recipe sets holds that recipe's value (the keys it leaves, their defaults); else the
    preset of the four switches."""
    values, base = flat(c), flat(base_config())
    recipe_keys = {k for keys in RECIPES.values() for k in keys}
    for name, keys in RECIPES.items():
        if all(values[k] == keys.get(k, base[k]) for k in recipe_keys):
            return name
    switches = (c.noise.weight, bool(c.noise.act), bool(c.swa.enabled), bool(c.optim.sam))
    return next((m for m, s in METHODS.items() if s == switches), "custom")


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _one_of(c: ml_collections.ConfigDict, key: str, allowed) -> None:
    value = flat(c)[key]
    _check(value in allowed, key, f"unknown {value!r}; choose from {tuple(allowed)}")


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raise ConfigError naming the key for anything out of range or contradictory.

    `num_devices`, if given, checks that the batch divides evenly over them.
    """
    from dnq_jax import data, models  # the registries of the lower floors

    _one_of(c, "model.name", models.names())
    known = f"{', '.join(data.NAMES)}, or {data.TFDS_PREFIX}BUILDER"
    _check(data.known(c.data.name), "data.name", f"unknown {c.data.name!r}; choose from {known}")
    for key in ("data.limit_train", "data.limit_test", "runtime.num_devices", "eval.iters"):
        _check(flat(c)[key] >= 0, key, f"must be >= 0, got {flat(c)[key]}")
    o, n, s, e, r = c.optim, c.noise, c.swa, c.eval, c.runtime
    _validate_data(c)
    _check(c.model.width > 0, "model.width", f"must be positive, got {c.model.width}")
    _one_of(c, "model.dtype", DTYPES)
    _check(o.num_epochs >= 1, "optim.num_epochs", f"must be positive, got {o.num_epochs}")
    _check(o.batch_size >= 1, "optim.batch_size", f"must be positive, got {o.batch_size}")
    _check(o.steps_per_epoch >= 0, "optim.steps_per_epoch", "must be >= 0 (0 = derived)")
    _check(o.learning_rate > 0, "optim.learning_rate", f"must be positive, got {o.learning_rate}")
    _check(0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1), got {o.momentum}")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(0 <= o.label_smoothing < 1, "optim.label_smoothing", "must be in [0, 1)")
    _check(0 <= o.warmup_epochs < o.num_epochs, "optim.warmup_epochs", "must be in [0, num_epochs)")
    for key in ("noise.w_bits", "noise.a_bits"):
        bits = flat(c)[key]
        _check(isinstance(bits, int) and 2 <= bits <= 16, key, f"must be 2..16, got {bits}")
    _check(0 <= n.rho <= 1, "noise.rho", f"must be in [0, 1], got {n.rho}")
    _check(n.tau > 0, "noise.tau", f"must be positive, got {n.tau}")
    _check(0 <= n.ema_decay < 1, "noise.ema_decay", f"must be in [0, 1), got {n.ema_decay}")
    _check(n.lambda_max >= 0, "noise.lambda_max", f"must be >= 0, got {n.lambda_max}")
    _check(n.w_scale >= 0, "noise.w_scale", f"must be >= 0, got {n.w_scale}")
    _one_of(c, "noise.ramp", RAMPS)
    _one_of(c, "noise.mask", MASKS)
    _one_of(c, "noise.weight", WEIGHT_NOISE)
    _one_of(c, "noise.dist", DISTS)
    _one_of(c, "noise.act_sites", ACT_SITES)
    _one_of(c, "noise.w_quantizer", W_QUANTIZERS)
    _one_of(c, "noise.error_sign", ERROR_SIGNS)
    _one_of(c, "optim.schedule", SCHEDULES)
    _check(
        o.schedule != "cosine_to_swa" or s.enabled,
        "optim.schedule",
        "cosine_to_swa runs the cosine to zero at swa.start_epoch: it needs SWA on",
    )
    _one_of(c, "eval.calibrator", CALIBRATORS)
    _one_of(c, "noise.calibrator", CALIBRATORS)
    _one_of(c, "eval.method", ptq_methods())
    _one_of(c, "runtime.loop", LOOPS)
    _check(c.quant.n_calib >= 1, "quant.n_calib", f"must be positive, got {c.quant.n_calib}")
    nc = c.noise.n_calib
    _check(nc >= 0, "noise.n_calib", f"must be >= 0 (0: quant.n_calib), got {nc}")
    for key in ("eval.batch_size", "eval.every_epochs", "runtime.ckpt_every_epochs"):
        _check(flat(c)[key] >= 1, key, "must be positive")
    _check(r.keep_checkpoints >= 1, "runtime.keep_checkpoints", "must be positive")
    _check(r.chunk_steps >= 0, "runtime.chunk_steps", "must be >= 0 (0 = automatic)")
    parse_bits(e.bits)
    if uses_noise(c):
        _check(
            0 <= n.start_epoch < o.num_epochs,
            "noise.start_epoch",
            f"must be in [0, optim.num_epochs={o.num_epochs}) when noise is on, got "
            f"{n.start_epoch}",
        )
    if s.enabled:
        _check(
            0 <= s.start_epoch < o.num_epochs,
            "swa.start_epoch",
            f"the SWA window must lie inside the run: need 0 <= swa.start_epoch < "
            f"optim.num_epochs={o.num_epochs}, got {s.start_epoch}",
        )
    _check(
        not (o.sam and n.weight == "accumulate"),
        "optim.sam",
        "SAM and noise.weight='accumulate' both rewrite the params; use one",
    )
    if s.lr is not None:
        _check(s.enabled, "swa.lr", "is set but SWA is off (method / swa.enabled)")
        _check(s.lr > 0, "swa.lr", f"must be positive, got {s.lr}")
    if o.sam:
        _check(o.sam_rho > 0, "optim.sam_rho", f"must be positive when SAM is on, got {o.sam_rho}")
    if num_devices is not None:
        _check(
            o.batch_size % num_devices == 0,
            "optim.batch_size",
            f"{o.batch_size} is not divisible by the {num_devices} devices in use",
        )


def _validate_data(c: ml_collections.ConfigDict) -> None:
    """The data keys: the source, the recipe and the folder fit the data set."""
    from dnq_jax import data

    d, r = c.data, c.runtime
    _one_of(c, "data.augment", AUGMENTS)
    _one_of(c, "runtime.data_source", DATA_SOURCES)
    size = d.image_size
    _check(size == 0 or size >= 8, "data.image_size", f"must be 0 (the set's own) or >= 8: {size}")
    _check(0 <= d.val_split < 1, "data.val_split", f"must be in [0, 1), got {d.val_split}")
    frac = r.device_data_fraction
    _check(0 < frac <= 1, "runtime.device_data_fraction", f"must be in (0, 1], got {frac}")
    _check(r.data_workers >= -1, "runtime.data_workers", "must be >= 0, or -1 (automatic)")
    _check(
        d.name != "folder" or bool(r.image_folder),
        "runtime.image_folder",
        "data.name=folder reads the image folder this key names; it is empty",
    )
    streams = data.streams(d.name)
    _check(
        streams or r.data_source != "stream",
        "runtime.data_source",
        f"data.name={d.name} is read whole from its files (no streaming form); use auto or device",
    )
    inception = data.recipe(d.name, d.augment) == "inception"
    _check(
        not inception or streams,
        "data.augment",
        f"inception runs on the stream's host workers; data.name={d.name} is not streamed",
    )
    _check(
        not inception or r.data_source != "device",
        "runtime.data_source",
        "device: the inception recipe (data.augment) runs on the stream's host workers; use "
        "auto or stream, or data.augment=crop_flip",
    )


def flat(c: ml_collections.ConfigDict | dict) -> dict:
    """{'group.key': value} for every key (the spelling of KEYS and of error messages)."""
    d = c.to_dict() if isinstance(c, ml_collections.ConfigDict) else c
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in flat(v).items()})
        else:
            out[k] = v
    return out


def resume_conflicts(saved: dict, c: ml_collections.ConfigDict) -> list[str]:
    """Keys outside RESUME_FREE_GROUPS whose value differs from the `saved` run's config.

    A key the saved config lacks (it predates the key) counts at today's default, which is
    the behaviour the run had.
    """
    old, new = {**flat(base_config()), **flat(saved)}, flat(c)
    free = lambda k: k.split(".", 1)[0] in RESUME_FREE_GROUPS
    return sorted(k for k in set(old) | set(new) if not free(k) and old.get(k) != new.get(k))


def to_json(c: ml_collections.ConfigDict) -> str:
    return json.dumps(c.to_dict(), indent=2, sort_keys=True)


def from_json_text(text: str, source: str = "config.json") -> ml_collections.ConfigDict:
    """The locked config a run wrote as JSON (its config.json), checked like a new one.

    Keys missing from an older file take today's defaults. Raises ConfigError, naming
    `source`, for text that is not a JSON object, an unknown key, or a value out of range.
    """
    try:
        saved = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source} is not valid JSON ({e}); the workdir is damaged.") from e
    if not isinstance(saved, dict):
        raise ConfigError(f"{source} holds {type(saved).__name__}, expected a JSON object")
    c = base_config()
    unknown = sorted(set(flat(saved)) - set(flat(c)))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; written by another version?")
    try:
        c.update(saved)
        validate(c)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{source}: {e}. Fix or restore the file.") from None
    c.lock()
    return c


def bits_name(wb: int, ab: int) -> str:
    """(4, 4) -> 'w4a4': the key of a precision in results files and tables."""
    return f"w{wb}a{ab}"


def parse_bits(spec: str) -> list[tuple[int, int]]:
    """'w8a8,w4a4' -> [(8, 8), (4, 4)]; raises ConfigError on malformed or out-of-range bits."""
    out = []
    for item in [s.strip().lower() for s in spec.split(",") if s.strip()]:
        try:
            w, a = item.removeprefix("w").split("a")
            wb, ab = int(w), int(a)
        except ValueError:
            raise ConfigError(f"eval.bits: cannot read {item!r}; write e.g. 'w4a4,w2a4'") from None
        _check(2 <= wb <= 16 and 2 <= ab <= 16, "eval.bits", f"{item}: bits must be 2..16")
        out.append((wb, ab))
    return out


def split_arg(arg: str | None) -> tuple[set[str], list[str]]:
    """Split a config-file argument such as 'smoke,optim.lr=0.1' into presets and pairs."""
    words, pairs = set(), []
    for item in [s.strip() for s in (arg or "").split(",") if s.strip()]:
        if "=" in item:
            pairs.append(item)
        elif item in PRESETS:
            words.add(item)
        else:
            raise ConfigError(f"config argument {item!r}: not key=value nor one of {PRESETS}")
    return words, pairs


def apply_pairs(c: ml_collections.ConfigDict, pairs: list[str]) -> ml_collections.ConfigDict:
    """Set `group.key=value` items on `c`, each value parsed as the key's type."""
    known = flat(base_config())
    for item in pairs:
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in known:
            raise ConfigError(unknown_key_message(key, f"given as {item!r}"))
        group, _, leaf = key.rpartition(".")
        node = c[group] if group else c
        current = known[key] if node[leaf] is None else node[leaf]
        try:
            node[leaf] = _parse(value, current)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{key}: cannot set {value!r}: {e}") from None
    return c


def _parse(value: str, like):
    if isinstance(like, bool) or value.lower() in ("true", "false"):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(value)
        return value.lower() in ("true", "1")
    if like is None:  # an optional float (swa.lr)
        return None if value.lower() == "none" else float(value)
    return type(like)(value) if isinstance(like, (int, float)) else value


def unknown_key_message(key: str, how: str) -> str:
    """A one-line ConfigError text for an unknown key, with the nearest known one."""
    known = sorted(flat(base_config()))
    if key == "method":
        return (
            f"method: not a config key ({how}); it is a preset of the config file's "
            "argument: --config=configs/resnet.py:method=sgd"
        )
    near = difflib.get_close_matches(key, known + [k.split(".")[-1] for k in known], n=1)
    if near and near[0] not in known:  # a bare leaf name: name its group
        near = [k for k in known if k.endswith("." + near[0])][:1]
    hint = f" Did you mean {near[0]!r}?" if near else ""
    return f"{key}: unknown config key ({how}).{hint} Known: {', '.join(known)}"


def reference_table() -> str:
    """The config reference of docs/config.md (a markdown table), generated from KEYS."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, meaning in KEYS:
        shown = "''" if default == "" else default
        rows.append(f"| `{key}` | {shown} | {meaning} |")
    return "\n".join(rows)
