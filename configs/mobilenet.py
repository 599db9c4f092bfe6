"""The paper protocol on MobileNetV2 (width 1.0), CIFAR strides.

Command:
  python train.py --config configs/mobilenet.py --workdir workdirs/mbv2_dnq
  python train.py --config configs/mobilenet.py:model=mobilenet_v1,method=sgd --workdir W

The paper reports MobileNetV2 at W4A4, so the noise is modelled at W4A4 here and the
evaluation includes w4a4. Arguments as in configs/resnet.py (`smoke`, `fast`, key=value).

Expected time (CIFAR-10, batch 64, 400 epochs, 312,400 steps): on 2 CPU cores 8.6 s per clean
step and 9.8 s per noisy step (`benchmarks/train_speed.py --model mobilenet_v2 --batch 64`),
about a month, so use `smoke` there. Not yet timed on a GPU: run the same benchmark there.
"""

from configs import resnet
from dnq_jax import config as cfg


def get_config(arg: str | None = None):
    words, pairs = cfg.split_arg(arg, resnet.PRESETS)
    c = cfg.base_config()
    c.model = "mobilenet_v2"
    c.w_bits = 4
    c.a_bits = 4
    if "smoke" in words:
        resnet.smoke(c)
        c.model = "mobilenet_v2"
        c.width = 0.25
    if "fast" in words:
        resnet.fast(c)
    cfg.apply_pairs(c, pairs)
    c.lock()
    return c
