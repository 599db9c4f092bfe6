"""Train with DNQ (or an ablation) and evaluate with PTQ.

  python train.py --config configs/resnet.py --workdir workdirs/r20_dnq
  python train.py --config configs/resnet.py:smoke --workdir /tmp/smoke
  python train.py --config configs/resnet.py --config.method=sgd --config.num_epochs=40 ...

Flags only; the work is `dnq_jax.train.train_and_evaluate(config, workdir)`. Re-running the
same command resumes from the newest checkpoint in the workdir.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py[:args]).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
flags.DEFINE_bool("verbose", False, "Show tracebacks for expected errors.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines off the console
    from dnq_jax import cli, evaluate, train

    def run():
        try:
            results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
        except train.Preempted as e:
            print(f"dnq_jax: {e}", file=sys.stderr)
            return 0
        print(evaluate.format_table(results, f"\nresults ({FLAGS.workdir}/results.json):"))
        return 0

    sys.exit(cli.run_guarded(run, FLAGS.verbose, extra={train.Diverged: 6}))


if __name__ == "__main__":
    from dnq_jax.cli import parse_flags

    app.run(main, flags_parser=parse_flags)
