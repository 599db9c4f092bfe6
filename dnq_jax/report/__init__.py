"""A finished run's report: W/report.md, W/report.json (every number) and W/report/*.png.

  python evaluate.py --workdir W --report [--report-bits w4a4,w2a4] [--report-images 1024]

`write_report(workdir, settings)` loads the run's config and final variables and writes:

1. PTQ: every result table the workdir holds (results.json from training, ptq_results.json
   from evaluate.py, a grid's ptq_<method>.json), one row per PTQ method, and accuracy
   against bit-width (`collect.py`). With none, the run's own `eval` settings are evaluated
   first (and written to ptq_results.json).
2. Training curves from metrics.jsonl.
3. Quantization error per layer at each bit-width of `bits` (default: the precision the
   run's noise was modelled at, for a run without noise W4A4 and W2A4), with the
   evaluation's own RTN (`diagnostics.error_setup`: BN folded, first/last layer at 8 bits,
   calibrated on the run's quant.n_calib images): weight and activation error statistics
   (std, KS distance to the fitted Gaussian, excess kurtosis) with histograms, and the
   output-error decomposition W dx vs dW x per layer, summed over layers into one ratio.
4. Flatness of the training loss (cross-entropy with the run's label smoothing, BatchNorm in
   eval mode, weight decay left out) on `images` training images: the top Hessian eigenvalue
   (power iteration, stopped once an estimate changes by at most `hessian_tol` relative
   to the previous one), the Hessian trace (Hutchinson, mean +- standard error) and 1-D and
   2-D filter-normalised loss landscapes.

The measurements (3 and 4) are `dnq_jax.diagnostics.measure`'s, which fixes the images and
the random vectors, so runs measured with the same settings are measured alike
(experiments/flatness.py). Every section's wall time is recorded in report.json and
report.md (`markdown.py`). The report sits above the trainer, which never imports it.
"""

from dnq_jax.report.collect import collect_ptq, training_summary
from dnq_jax.report.markdown import format_report, row_label
from dnq_jax.report.write import ReportSettings, default_bits, write_report

__all__ = [
    "ReportSettings",
    "collect_ptq",
    "default_bits",
    "format_report",
    "row_label",
    "training_summary",
    "write_report",
]
