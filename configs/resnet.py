"""The paper protocol (docs/method.md, "Schedule") on a CIFAR ResNet.

Command:
  python train.py --config configs/resnet.py --workdir workdirs/r20_dnq
  python train.py --config configs/resnet.py:model.name=resnet56,method=sgd --workdir W
  python train.py --config configs/resnet.py:smoke --workdir /tmp/smoke      # seconds, CPU ok

Arguments (comma-separated, after ':'): `smoke`, `fast`, `method=NAME` (sgd, swa, wqn, aqn,
dnq, dnq_half, naive, lam08, authors, accumulate, sam), or any `group.key=value` of the config, e.g.
`data.name=cifar100`, `model.name=resnet18`, `noise.lambda_max=0.5`.

400 epochs, clean warm-up to epoch 200, noise from 200 with an 80-epoch linear ramp, SWA over
the last 100 epochs, SGD Nesterov 0.9, lr 0.015 cosine, wd 1e-3, batch 64, label smoothing
0.1, noise modelled at W2A4 on quant.n_calib=100 images.

Expected time (ResNet-20, CIFAR-10, batch 64, 400 epochs): on one H100/H200 about 15-20
minutes, an estimate not yet timed (a plain scanned epoch of 781 steps takes 1.69 s on an
H200, and the DNQ step measured 1.17-1.20x the plain one there, so ~2 s per epoch); on 2 CPU
cores about a day and a half (measured: 0.32 s per clean step, 0.39 s per noisy step,
`benchmarks/train_speed.py --batch 64`), so use `fast` or `smoke` there. `smoke` (synthetic
data, resnet8, 4 epochs of 4 steps) takes about 30 s on 2 CPU cores.
"""

from dnq_jax.train import config


def get_config(arg: str | None = None):
    return config.build(arg)
