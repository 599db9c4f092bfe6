"""The paper protocol (DESIGN.md section 3) on a CIFAR ResNet.

Command:
  python train.py --config configs/resnet.py --workdir workdirs/r20_dnq
  python train.py --config configs/resnet.py:model=resnet56,method=sgd --workdir workdirs/r56_sgd
  python train.py --config configs/resnet.py:smoke --workdir /tmp/smoke      # seconds, CPU ok

Arguments (comma-separated, after ':'): `smoke`, `fast`, or any `key=value` of the config,
e.g. model=resnet18, dataset=cifar100, method=sgd|swa|wqn|aqn|dnq|naive|accumulate|sam.

400 epochs, clean warm-up to epoch 200, noise from 200 with an 80-epoch linear ramp, SWA over
the last 100 epochs, SGD Nesterov 0.9, lr 0.015 cosine, wd 1e-3, batch 64, label smoothing
0.1, noise modelled at W2A4 on n_calib=100 images.

Expected time (ResNet-20, CIFAR-10, batch 64, 400 epochs): on one H100/H200 about 15-20
minutes, an estimate not yet timed (a plain scanned epoch of 781 steps takes 1.69 s on an
H200, and the DNQ step measured 1.17-1.20x the plain one there, so ~2 s per epoch); on 2 CPU
cores about a day and a half (measured: 0.32 s per clean step, 0.39 s per noisy step,
`benchmarks/train_speed.py --batch 64`), so use `fast` or `smoke` there. `smoke` (synthetic
data, resnet8, 4 epochs of 4 steps) takes about 30 s on 2 CPU cores.
"""

from dnq_jax import config as cfg

PRESETS = ("smoke", "fast")


def smoke(c):
    """A few steps of a tiny model on synthetic data: every stage runs (warm-up, noise, SWA)."""
    c.model = "resnet8"
    c.dataset = "synthetic"
    c.limit_train = 256
    c.limit_test = 128
    c.batch_size = 32
    c.steps_per_epoch = 4
    c.num_epochs = 4
    c.noise_start_epoch = 1
    c.ramp_epochs = 2
    c.swa_start_epoch = 2
    c.n_calib = 16
    c.eval_batch_size = 64
    c.eval_bits = "w8a8,w4a4"
    c.ckpt_every_epochs = 1
    c.learning_rate = 0.05
    return c


def fast(c):
    """The same protocol scaled to 40 epochs (noise from 20, SWA over the last 10)."""
    c.num_epochs = 40
    c.noise_start_epoch = 20
    c.ramp_epochs = 8
    c.swa_start_epoch = 30
    return c


def get_config(arg: str | None = None):
    words, pairs = cfg.split_arg(arg, PRESETS)
    c = cfg.base_config()
    if "smoke" in words:
        smoke(c)
    if "fast" in words:
        fast(c)
    cfg.apply_pairs(c, pairs)
    c.lock()
    return c
