"""``sam-optax compare``: train real models with every method and measure what each buys.

For each method specification (a registry name with optional overrides,
``looksam:alpha=0.3``) and each seed, a small Flax model is trained on built-in
data (MNIST-1D, or scikit-learn's digits) with the method chained in front of a
base optimizer (SGD with momentum, or AdamW; cosine decay and decoupled weight
decay). Reported per method: test accuracy (mean and std over seeds), final
training loss, the top Hessian eigenvalue of the training loss on a fixed batch,
gradient evaluations per step (counted), the probe fraction, wall time per step
and cost relative to ``sgd`` (timed after training, each method's steps right
after as many of ``sgd``'s).

The package is laid out as the job is: :mod:`~sam_optax.compare.data` (datasets
and label noise), :mod:`~sam_optax.compare.models`, :mod:`~sam_optax.compare.specs`
(method specifications and sweeps, parsed), :mod:`~sam_optax.compare.training`
(one method trained for every seed), :mod:`~sam_optax.compare.timing`,
:mod:`~sam_optax.compare.report` (table, JSON, figures) and
:mod:`~sam_optax.compare.run` (:func:`run_compare`, which ties them together).

The models, datasets, progress bar and figures need the ``examples`` extra; they
are imported inside the functions that use them.
"""

from sam_optax.compare.data import DATASETS, NUM_CLASSES, add_label_noise, load_dataset
from sam_optax.compare.models import make_model
from sam_optax.compare.report import CompareResult, prepare_out, sweep_figure
from sam_optax.compare.run import run_compare
from sam_optax.compare.specs import (
    BASELINE,
    MethodSpec,
    expand_sweep,
    parameters,
    parse_method,
    resolve_methods,
)
from sam_optax.compare.timing import TIMING_ROUNDS
from sam_optax.compare.training import BASES, CURVE_POINTS, DEFAULT_BATCH_SIZE, DEFAULT_STEPS

__all__ = [
    "BASELINE",
    "BASES",
    "CURVE_POINTS",
    "DATASETS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_STEPS",
    "NUM_CLASSES",
    "TIMING_ROUNDS",
    "CompareResult",
    "MethodSpec",
    "add_label_noise",
    "expand_sweep",
    "load_dataset",
    "make_model",
    "parameters",
    "parse_method",
    "prepare_out",
    "resolve_methods",
    "run_compare",
    "sweep_figure",
]
