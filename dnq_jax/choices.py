"""Every list of allowed values the library and the config share, written once.

Kept free of JAX (and of everything else) so that `dnq_jax.train.config` can check a config
without starting a backend, while the functions that use each value (`dnq.noise`,
`dnq.ramps`, `dnq.profiler`, `ptq.calibration`) check their arguments against the same
tuple.
"""

# Weight noise forms (docs/method.md); "none" is the config's switch, not a mode of the noise.
WEIGHT_MODES = ("differential", "naive", "accumulate")
WEIGHT_NOISE = ("none", *WEIGHT_MODES)
# Drop-in masks.
MASKS = ("uniform", "salience")
# Shapes of the lambda ramp.
RAMPS = ("linear", "cosine", "exp")
# Law of the injected samples: the paper's Gaussian, or a uniform of the same mean and
# variance (bounded, like a rounding error).
DISTS = ("gaussian", "uniform")
# The weight quantizer whose error the profiler models: the evaluation's own, or the
# authors' profiler's symmetric one (docs/protocol.md).
W_QUANTIZERS = ("evaluation", "symmetric")
# Where the activation drop-in goes: every Conv/Dense input, or only the inputs that are
# ReLU outputs (the authors' ReLU modules).
ACT_SITES = ("inputs", "relu")
# Sign of the modelled error: Q(x) - x (the paper) or x - Q(x) (the authors' code).
ERROR_SIGNS = ("paper", "authors")
# Learning-rate schedules: cosine over the whole run (swa.lr optional), or cosine to zero at
# the SWA start and then a constant swa.lr (the authors' code).
SCHEDULES = ("cosine", "cosine_to_swa")
# How repeated steps run: a rolled scan, straight-line code, or by backend (`backend.scans`).
LOOPS = ("auto", "scan", "unroll")
# Terms of the per-layer output-error decomposition (diagnostics.layer_errors, the report).
DECOMPOSITION_TERMS = ("activation", "weight", "cross", "total")
# Range calibrators of the quantizers.
WEIGHT_CALIBRATORS = ("minmax", "mse")
ACTIVATION_CALIBRATORS = ("minmax", "percentile", "mse")
# Where the data comes from: whole on every device, streamed from its files per host, or
# chosen by size (docs/data.md).
DATA_SOURCES = ("auto", "device", "stream")
# Augmentation recipes (dnq_jax.data.names.recipe): pad-crop (+ flip) on the device, the
# ImageNet recipe on the host workers, none; auto: the data set's own.
AUGMENTS = ("auto", "crop_flip", "crop", "inception", "none")
