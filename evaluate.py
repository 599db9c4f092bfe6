"""PTQ-evaluate a finished run: FP32 and each W/A bit-width on the full test split.

  python evaluate.py --workdir workdirs/r20_dnq --bits w4a4,w2a4,w2a2 --method rtn

Prints a table and writes WORKDIR/ptq_results.json ({"fp32": top1, "w4a4": top1, ...,
"settings": {...}}). The model and data come from WORKDIR/config.json.
"""

import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A workdir written by train.py.")
flags.DEFINE_string("bits", None, "Comma-separated wXaY list; default: the run's eval_bits.")
flags.DEFINE_enum("method", "rtn", ["rtn"], "PTQ method.")
flags.DEFINE_bool("verbose", False, "Show tracebacks for expected errors.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from dnq_jax import cli, evaluate

    def run():
        results = evaluate.evaluate_workdir(FLAGS.workdir, FLAGS.bits, FLAGS.method)
        print(evaluate.format_table(results, f"{FLAGS.workdir} ({FLAGS.method}):"))
        print(f"written: {FLAGS.workdir}/ptq_results.json")
        return 0

    sys.exit(cli.run_guarded(run, FLAGS.verbose))


if __name__ == "__main__":
    from dnq_jax.cli import parse_flags

    app.run(main, flags_parser=parse_flags)
