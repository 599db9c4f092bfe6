"""The paper protocol on MobileNetV2 (width 1.0), CIFAR strides.

Command:
  python train.py --config configs/mobilenet.py --workdir workdirs/mbv2_dnq
  python train.py --config configs/mobilenet.py:model.name=mobilenet_v1,method=sgd --workdir W

The paper reports MobileNetV2 at W4A4, so the noise is modelled at W4A4 here and the
evaluation includes w4a4. Arguments as in configs/resnet.py (`smoke`, `fast`, `method=...`,
`group.key=value`); `smoke` keeps MobileNetV2, at width 0.25.

Expected time (CIFAR-10, batch 64, 400 epochs, 312,400 steps): on 2 CPU cores 8.6 s per clean
step and 9.8 s per noisy step (`benchmarks/train_speed.py --model mobilenet_v2 --batch 64`),
about a month, so use `smoke` there. Not yet timed on a GPU: run the same benchmark there.
"""

from dnq_jax.train import config


def get_config(arg: str | None = None):
    words, pairs = config.split_arg(arg)
    keys = {"model.name": "mobilenet_v2", "noise.w_bits": 4, "noise.a_bits": 4}
    if "smoke" in words:
        keys["model.width"] = 0.25
    # The smoke preset sets its own model: name this one again after it.
    pinned = [f"{k}={v}" for k, v in keys.items()]
    return config.build(",".join([*sorted(words), *pinned, *pairs]))
