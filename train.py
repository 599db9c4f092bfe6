"""Train with DNQ (or an ablation) and evaluate with PTQ.

  python train.py --config configs/resnet.py --workdir workdirs/r20_dnq
  python train.py --config configs/resnet.py:smoke --workdir /tmp/smoke
  python train.py --config configs/resnet.py:method=sgd --config.optim.num_epochs=40 ...

The same command is installed as `dnq-train`. Flags only; the work is
`dnq_jax.train.train_and_evaluate(config, workdir)`. Re-running the same command resumes
from the newest checkpoint in the workdir.
"""

from dnq_jax.cli.train import train_main

if __name__ == "__main__":
    train_main()
