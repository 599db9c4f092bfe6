"""The paper protocol on VGG-16-BN.

Command:
  python train.py --config configs/vgg.py --workdir workdirs/vgg_dnq

Arguments as in configs/resnet.py (`smoke`, `fast`, `method=...`, `group.key=value`).
Expected time (CIFAR-10, batch 64, 400 epochs, 312,400 steps): on 2 CPU cores 5.7 s per clean
step and 6.4 s per noisy step (`benchmarks/train_speed.py --model vgg16_bn --batch 64`), about
three weeks, so use `smoke` there. Not yet timed on a GPU: run the same benchmark there.
"""

from dnq_jax.train import config


def get_config(arg: str | None = None):
    # A default, not a pin: `smoke` runs its own tiny model.
    return config.build(arg, **{"model.name": "vgg16_bn"})
