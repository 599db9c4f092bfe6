"""Diagnostics: why a model survives quantization, measured on any Flax model.

- Quantization error per layer, with the evaluation's own quantizers (`error_setup`):
  weight and activation error statistics (`weight_error_stats`, `activation_error_stats`:
  histogram, mean, std, KS distance to the fitted Gaussian, excess kurtosis) and the
  output-error decomposition ``W (x_hat - x)`` vs ``(W_hat - W) x``
  (`output_error_decomposition`).
- Flatness of the minimum on a fixed data set (`make_loss_fn`): the Hessian's top eigenvalue
  (`top_hessian_eigenvalue`) and trace (`hessian_trace`), and loss landscapes along
  filter-normalised directions (`loss_landscape_1d`, `loss_landscape_2d`).
- A finished model measured alike across runs (`measure.py`: `measure_errors`,
  `measure_flatness`, on the training images of `training_subset`, with one
  `MeasureSettings`), as a run's report and experiments/flatness.py use them.
- PNG plots of all of these and of results and training curves (`plots`).

    setup = error_setup(model, variables, calib_images, QuantSpec(w_bits=2, a_bits=4))
    decomposition = output_error_decomposition(setup, calib_images)
    loss_fn = make_loss_fn(model, variables, images, labels, batch_size=256)
    top = top_hessian_eigenvalue(loss_fn, variables["params"], jax.random.key(0), iters=20)
"""

from dnq_jax.diagnostics import plots
from dnq_jax.diagnostics.error_stats import ErrorStats, error_stats, ks_gaussian
from dnq_jax.diagnostics.hessian import (
    EigenResult,
    TraceResult,
    hessian_trace,
    hvp,
    random_tree,
    top_hessian_eigenvalue,
    tree_vdot,
)
from dnq_jax.diagnostics.landscape import (
    Landscape,
    filter_normalized_direction,
    loss_landscape_1d,
    loss_landscape_2d,
)
from dnq_jax.diagnostics.layer_errors import (
    DECOMPOSITION_TERMS,
    ErrorSetup,
    activation_error_stats,
    error_setup,
    output_error_decomposition,
    weight_error_stats,
    weight_errors,
)
from dnq_jax.diagnostics.loss import ChunkedLoss, as_chunked, make_loss_fn
from dnq_jax.diagnostics.measure import (
    MeasureSettings,
    measure_errors,
    measure_flatness,
    training_subset,
)

__all__ = [
    "DECOMPOSITION_TERMS",
    "ChunkedLoss",
    "EigenResult",
    "ErrorSetup",
    "ErrorStats",
    "Landscape",
    "MeasureSettings",
    "TraceResult",
    "activation_error_stats",
    "as_chunked",
    "error_setup",
    "error_stats",
    "filter_normalized_direction",
    "hessian_trace",
    "hvp",
    "ks_gaussian",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "make_loss_fn",
    "measure_errors",
    "measure_flatness",
    "output_error_decomposition",
    "plots",
    "random_tree",
    "top_hessian_eigenvalue",
    "training_subset",
    "tree_vdot",
    "weight_error_stats",
    "weight_errors",
]
