"""DNQ on ImageNet-style data: ResNet-50 / ResNet-18 (ImageNet form), the stream.

Command (the ArrayRecord build of imagenet2012 in the TFDS data_dir, docs/data.md):
  python train.py --config configs/imagenet.py --workdir workdirs/r50_imagenet_dnq
  python train.py --config configs/imagenet.py:model.name=resnet18_imagenet --workdir W
  python train.py --config configs/imagenet.py:method=sgd --workdir workdirs/r50_imagenet_sgd
  python train.py --config configs/imagenet.py:data.name=folder,data.image_size=64 \\
      --config.runtime.image_folder=/data/tiny-imagenet-200 --workdir W   # Tiny-ImageNet
Several hosts: the same command on every host with `--distributed` (or the three
coordinator flags) and a workdir on a shared file system (docs/running.md#many-hosts).
`smoke` is configs/resnet.py's (synthetic data, resnet8): a check of the command only.

The paper's protocol (configs/resnet.py: 400 CIFAR epochs, clean warm-up to 200, an 80-epoch
lambda ramp, SWA over the last 100, SGD Nesterov lr 0.015 cosine, wd 1e-3, batch 64, label
smoothing 0.1) scaled to ImageNet:
- 90 epochs, the standard ImageNet ResNet budget (400 would cost 4.4x as much), with the
  protocol's fractions of the run kept: clean for the first half (noise from epoch 45), the
  ramp over 18 epochs (80/400), SWA over the last 22 (100/400: from epoch 68);
- batch 1024 (128 per GPU on 8), lr 0.4 = 0.1 x 1024 / 256 (the linear scaling rule of
  Goyal et al.) after a 5-epoch linear warm-up: 0.015 at batch 1024 would barely move a
  ResNet-50 in 90 epochs; weight decay 1e-4, the ImageNet ResNet value (1e-3 is CIFAR's,
  tuned for 400 epochs of small images); bfloat16 compute on the accelerators;
- the ImageNet augmentation (random-resized crop + flip at 224 on the host workers, resize to
  256 and centre crop for evaluation) instead of CIFAR's pad-crop;
- the noise modelled at W4A4 (the setting ImageNet PTQ papers lead with; W2A4 is
  `noise.w_bits=2`), evaluated at w8a8, w4a4 and w2a4; 1024 calibration images for the PTQ
  evaluation (the ImageNet PTQ papers' count) and 256 for the profiler; the test accuracy
  every 5 epochs (each a pass over the 50,000 validation images), a checkpoint every epoch.

Expected time, estimates (no step of these models has been timed on a GPU or TPU here; on
this project's 2-core CPU a ResNet-50 step at 224 consumes 0.9 images a second,
benchmarks/RESULTS.md: about 16 days an epoch, out of reach). Epoch time = 1,281,167 images / (N
accelerators x r / 1.2), r the plain ResNet-50 step's images per second on one accelerator
and 1.2 the DNQ step's cost over the plain one (measured on an H200, ResNet-20). With r =
2,500 on an H100 (an outside figure for bf16 JAX training, not measured here): one 8-GPU
host about 75 s per epoch, about 2 hours for 90 epochs plus about 15 minutes of evaluation,
BN re-estimation and PTQ; a TPU v4-32 slice (16 chips, 4 hosts) with r = 2,000 per chip (also
an outside figure) about 50 s per epoch, 1.2 hours for 90. Both hold only if each host
decodes fast enough: the 8-GPU host about 17,000 images a second, which at the 2.4 CPU ms
per 500x375 JPEG measured here (benchmarks/RESULTS.md) is about 40 worker cores
(`runtime.data_workers=-1` takes the host's cores minus 2, at most 64); each TPU host about
6,700 a second, about 16 cores. ResNet-18 (2.3x fewer FLOPs) would need about 90 cores per
8 GPUs, more than 64 workers: expect it to be input-bound.
"""

from dnq_jax.train import config

# The ImageNet recipe (module docstring); `smoke` drops what its 4-epoch scale cannot hold.
IMAGENET = {
    "model.name": "resnet50_imagenet",
    "model.dtype": "bfloat16",
    "data.name": "imagenet2012",
    "optim.num_epochs": 90,
    "optim.batch_size": 1024,
    "optim.learning_rate": 0.4,
    "optim.warmup_epochs": 5,
    "optim.weight_decay": 1e-4,
    "noise.start_epoch": 45,
    "noise.ramp_epochs": 18,
    "noise.w_bits": 4,
    "noise.a_bits": 4,
    "noise.n_calib": 256,
    "swa.start_epoch": 68,
    "quant.n_calib": 1024,
    "eval.every_epochs": 5,
    "eval.bits": "w8a8,w4a4,w2a4",
    "runtime.ckpt_every_epochs": 1,
}
SMOKE_DROPS = ("model.dtype", "optim.warmup_epochs", "noise.n_calib")


def get_config(arg: str | None = None):
    words, _ = config.split_arg(arg)
    keys = dict(IMAGENET)
    if "smoke" in words:
        keys = {k: v for k, v in keys.items() if k not in SMOKE_DROPS}
    return config.build(arg, **keys)
