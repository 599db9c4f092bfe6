"""The configuration's keys, defaults and meanings, and the method presets: data only.

`dnq_jax.train.config` builds, checks and documents configs from these tables
(docs/config.md is generated from `KEYS`). Imports nothing, so reading it costs nothing.
"""

from __future__ import annotations

# method -> (noise.weight, noise.act, swa.enabled, optim.sam): the ablations of docs/method.md.
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
# Presets that set more than the four switches: method -> {key: value}. `authors` is the
# recipe of the paper's public code as far as it can be stated (docs/protocol.md): its
# switches are naive's, the rest of its differences are the keys below. `lam08` is two of
# those keys alone, naive's in-place weight noise at the authors' lambda_max of 0.8: the row
# of the authors' path closest to both of the study's bars. `dnq_half` is the paper's form
# with the noise held at lambda 0.5 after the ramp: over three seeds of the Fashion-MNIST
# study the variant closest to both bars, and the demo's (docs/results.md). A config is named
# after the first recipe whose every key it holds, so `authors` (which holds lam08's keys)
# comes first.
RECIPES = {
    "authors": {
        "noise.weight": "naive",
        "noise.act": True,
        "swa.enabled": True,
        "optim.sam": False,
        "noise.lambda_max": 0.8,
        "noise.w_quantizer": "symmetric",
        "noise.error_sign": "authors",
        "noise.act_sites": "relu",
        "noise.leftover": True,
        "noise.n_calib": 256,
        "optim.schedule": "cosine_to_swa",
    },
    "lam08": {
        "noise.weight": "naive",
        "noise.act": True,
        "swa.enabled": True,
        "optim.sam": False,
        "noise.lambda_max": 0.8,
    },
    "dnq_half": {
        "noise.weight": "differential",
        "noise.act": True,
        "swa.enabled": True,
        "optim.sam": False,
        "noise.lambda_max": 0.5,
    },
}
DTYPES = ("float32", "bfloat16")
PRESETS = ("smoke", "fast")
RESUME_FREE_GROUPS = ("eval", "runtime")

# (key, default, meaning): the config reference (docs/config.md) is generated from this table.
KEYS: tuple[tuple[str, object, str], ...] = (
    ("seed", 0, "root PRNG seed (init, data order, augmentation, noise)"),
    (
        "model.name",
        "resnet20",
        "zoo name: resnet8/20/32/56, resnet18/50 (CIFAR stem), resnet18_imagenet/"
        "resnet50_imagenet (7x7 stem + max-pool), mobilenet_v1/v2, vgg16_bn",
    ),
    ("model.width", 1.0, "width multiplier (mobilenet_v2 only)"),
    ("model.dtype", "float32", "compute dtype: float32 or bfloat16 (params stay float32)"),
    (
        "data.name",
        "cifar10_jpeg",
        "cifar10_jpeg, fashion_mnist, cifar10, cifar100, mnist, synthetic, imagenet2012, "
        "folder (runtime.image_folder), tfds:BUILDER (any TFDS ArrayRecord build)",
    ),
    ("data.limit_train", 0, "use a fixed sample of N training images (0 = all)"),
    ("data.limit_test", 0, "use a fixed sample of N test images (0 = all)"),
    (
        "data.image_size",
        0,
        "side of the square images the model sees (0: the set's own, CIFAR 32, MNIST 28; 224 "
        "for folders and ImageNet)",
    ),
    (
        "data.augment",
        "auto",
        "crop_flip / crop (pad-crop, flip, on the device), inception (random-resized crop + "
        "flip on the stream's host workers), none; auto: CIFAR crop_flip, MNIST-like crop, "
        "folders and TFDS builds inception",
    ),
    (
        "data.val_split",
        0.1,
        "an image folder without val/: this fraction of each class is held out for "
        "evaluation (a seeded draw)",
    ),
    ("optim.num_epochs", 400, "epochs"),
    ("optim.steps_per_epoch", 0, "0 = num_train // batch_size"),
    ("optim.batch_size", 64, "global batch (split over devices)"),
    ("optim.learning_rate", 0.015, "peak learning rate of the cosine schedule"),
    ("optim.warmup_epochs", 0, "linear learning-rate warm-up"),
    ("optim.momentum", 0.9, "SGD momentum"),
    ("optim.nesterov", True, "Nesterov momentum"),
    ("optim.weight_decay", 1e-3, "coupled L2 on kernels"),
    ("optim.label_smoothing", 0.1, "label smoothing of the cross-entropy"),
    (
        "optim.schedule",
        "cosine",
        "cosine (over the run; swa.lr optional) or cosine_to_swa (cosine to 0 at "
        "swa.start_epoch, then swa.lr, 0.01 x the peak if unset: the authors' code)",
    ),
    ("optim.sam", False, "SAM (optax.contrib.sam), the flat-minimum baseline (method=sam)"),
    ("optim.sam_rho", 0.05, "SAM neighbourhood radius"),
    ("noise.weight", "differential", "weight noise: none, differential, naive, accumulate"),
    ("noise.act", True, "activation drop-in on every Conv/Dense input"),
    (
        "noise.act_sites",
        "inputs",
        "drop-in sites: inputs (every Conv/Dense input) or relu (only inputs that are ReLU "
        "outputs, as the authors' ReLU hooks)",
    ),
    ("noise.dist", "gaussian", "law of the samples: gaussian, or uniform (same mean, variance)"),
    (
        "noise.leftover",
        False,
        "the last step of each noise epoch leaves its weight perturbation in the stored "
        "weights (the authors' in-place noise, forgotten at each refresh)",
    ),
    ("noise.start_epoch", 200, "first epoch with noise (clean warm-up before)"),
    ("noise.ramp_epochs", 80, "length of the lambda ramp"),
    ("noise.ramp", "linear", "ramp shape: linear, cosine, exp"),
    ("noise.lambda_max", 1.0, "noise scale at the end of the ramp"),
    (
        "noise.w_scale",
        1.0,
        "weight perturbation x this (0.7071: the differential form's variance equals the "
        "modelled error's)",
    ),
    ("noise.rho", 0.5, "drop-in mask rate"),
    ("noise.mask", "uniform", "drop-in mask: uniform or salience"),
    ("noise.tau", 1.0, "salience softmax temperature"),
    ("noise.ema_decay", 0.9, "EMA of the profiled error statistics"),
    ("noise.w_bits", 2, "weight bit-width of the modelled quantizer"),
    ("noise.a_bits", 4, "activation bit-width of the modelled quantizer"),
    ("noise.n_calib", 0, "profiler calibration images (0: quant.n_calib)"),
    (
        "noise.w_quantizer",
        "evaluation",
        "modelled weight quantizer: evaluation (its own, ends at 8 bits) or symmetric (the "
        "authors': scale max abs(W) / (2^(b-1) - 1), per channel for convs, per tensor for "
        "dense, all layers at w_bits)",
    ),
    (
        "noise.error_sign",
        "paper",
        "sign of the modelled error: paper (Q(x) - x) or authors (x - Q(x))",
    ),
    (
        "noise.calibrator",
        "minmax",
        "activation range calibrator of the modelled quantizer (match eval.calibrator)",
    ),
    ("quant.keep_ends_8bit", True, "first and last layer at 8 bits (profiler and evaluation)"),
    ("quant.n_calib", 100, "calibration images (profiler and evaluation)"),
    ("quant.calib_seed", 0, "seed of the calibration subset"),
    ("swa.enabled", True, "stochastic weight averaging (from method)"),
    ("swa.start_epoch", 300, "SWA averages the epochs from this one on"),
    ("swa.lr", None, "constant learning rate from the SWA start (None: keep the cosine)"),
    (
        "swa.bn_recalibration",
        True,
        "re-estimate the final BatchNorm statistics after SWA or noise (augmented data)",
    ),
    ("eval.every_epochs", 1, "FP32 test accuracy every N epochs"),
    ("eval.batch_size", 500, "evaluation batch"),
    ("eval.bits", "w8a8,w4a4,w2a4,w2a2", "PTQ bit-widths evaluated at the end"),
    ("eval.calibrator", "minmax", "activation range calibrator: minmax, percentile, mse"),
    ("eval.method", "rtn", "PTQ method of the final evaluation (dnq_jax.ptq)"),
    ("eval.iters", 0, "reconstruction iterations of the PTQ method (0 = its default)"),
    ("runtime.num_devices", 0, "devices in the data mesh (0 = all)"),
    (
        "runtime.chunk_steps",
        0,
        "steps per jitted call; 0 = a whole epoch when steps are scanned (runtime.loop), else 1",
    ),
    ("runtime.loop", "auto", "steps of a chunk: scan, unroll (straight-line), auto (scan off CPU)"),
    ("runtime.ckpt_every_epochs", 10, "checkpoint cadence"),
    ("runtime.keep_checkpoints", 2, "checkpoints kept"),
    ("runtime.progress", True, "progress bar"),
    (
        "runtime.rollback_on_nan",
        False,
        "on a non-finite step: restore the last checkpoint, halve lambda",
    ),
    ("runtime.npz_path", "", "cifar10_jpeg file ('' = ../shared/data/ beside the repository)"),
    ("runtime.data_dir", "", "decoded-data cache ('' = ./data_cache)"),
    ("runtime.tfds_data_dir", "", "TFDS data_dir ('' = the TFDS default)"),
    ("runtime.image_folder", "", "the image folder of data.name=folder (docs/data.md)"),
    (
        "runtime.data_source",
        "auto",
        "device (whole set on every device), stream (read per host by Grain workers), auto "
        "(device when its copy fits runtime.device_data_fraction of one device's memory and "
        "the augmentation runs on the device)",
    ),
    ("runtime.device_data_fraction", 0.25, "auto's share of one device's memory for the data"),
    (
        "runtime.data_workers",
        -1,
        "stream: worker processes per host decoding and augmenting (0: two threads of the "
        "trainer; -1: the host's cores minus 2, at most 64)",
    ),
)
