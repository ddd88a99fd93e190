"""One training run of ``sam-optax compare``: a method, trained for every seed, measured.

:class:`Setup` holds what every method of a comparison shares (data, model, base
optimizer, evaluation); :func:`train` trains one :class:`~sam_optax.compare.specs.MethodSpec`
for each seed and returns its result row and its compiled chunk for the timing.

Counting gradient evaluations. The per-example losses pass through an identity
whose backward rule fires a host callback adding ``n / batch_size`` (``n``
examples in the pass) to a counter. It fires only when a backward pass really
runs (a probe skipped by ``lax.cond`` adds nothing; ESAM's sub-batch adds
``gamma``); forward-only passes are not gradient evaluations and are not counted.

Hooks for methods (no per-method code here): every ``update`` receives
``per_example_loss_fn(params, batch) -> [B]`` and ``batch = (x, y)`` as extra
arguments, every optimizer is built with the training set's size (``num_data``) and
the shapes of one batch (``batch_like``, for a method that keeps the previous batch in
its state), a registry entry with ``eval_params`` is evaluated (accuracy, loss,
sharpness) on ``eval_params(params, opt_state)``, called eagerly, one with
``loss_term`` has ``loss_term(opt_state, apply, x, logits)`` added to the training loss
(inside the differentiated loss, so its gradient comes from the same backward pass; the
counter taps the cross-entropy only), one with ``uses_gradient=False`` has its clean pass
run forward only, and one with ``base_steps`` gets a base learning-rate schedule that
many times as long.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax import registry
from sam_optax._state import probe_fraction
from sam_optax.compare.data import batch_order, load_dataset
from sam_optax.compare.models import make_model
from sam_optax.compare.specs import MethodSpec
from sam_optax.compare.timing import TimedRun
from sam_optax.sharpness import hessian_top_eigenvalue

DEFAULT_STEPS = 1000
DEFAULT_BATCH_SIZE = 128
SHARPNESS_BATCH = 512
CURVE_POINTS = 15


@dataclasses.dataclass(frozen=True)
class Base:
    """A base optimizer of the comparison, built from a learning-rate schedule.

    Attributes:
      name: how it is named on the command line and in tables.
      learning_rate: the peak learning rate (cosine decay to 0 over training).
      weight_decay: decoupled weight decay, ``w ← w − lr_t (u + wd·w)``.
      make: ``schedule -> transformation`` without the weight decay.
      describe: one line for tables.
    """

    name: str
    learning_rate: float
    weight_decay: float
    make: Callable[[optax.Schedule], optax.GradientTransformation]
    describe: str

    def build(self, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
        """The base optimizer for ``steps`` steps and its learning-rate schedule."""
        schedule = optax.cosine_decay_schedule(self.learning_rate, steps)
        direction = self.make(schedule)
        return (
            optax.chain(
                direction,
                optax.add_decayed_weights(self.weight_decay),
                optax.scale_by_learning_rate(schedule),
            ),
            schedule,
        )


BASES: dict[str, Base] = {
    b.name: b
    for b in [
        Base(
            "sgd",
            0.1,
            5e-4,
            lambda schedule: optax.trace(decay=0.9),
            "SGD momentum 0.9, cosine decay from lr 0.1, decoupled weight decay 5e-4",
        ),
        # lr 1e-2: SGD's accuracy on MNIST-1D (93.1 % with one seed; 85.6 % at 3e-3,
        # 71.0 % at 1e-3).
        Base(
            "adamw",
            1e-2,
            1e-2,
            lambda schedule: optax.scale_by_adam(),
            "AdamW (b1 0.9, b2 0.999), cosine decay from lr 1e-2, decoupled weight decay 1e-2",
        ),
    ]
}


def check_base(name: Any) -> Base:
    """The :class:`Base` named ``name``, or a ``ValueError`` listing the choices."""
    if name not in BASES:
        raise ValueError(f"unknown base optimizer {name!r}; choose one of: {', '.join(BASES)}")
    return BASES[name]


class _GradCounter:
    """Counts backward passes, in units of one full batch, from inside compiled code.

    ``tap(losses, counting)`` is the identity; its backward pass adds to the count
    when the traced boolean ``counting`` is true, and skips the host callback
    otherwise, so one compiled program serves both training and timing.
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.value = 0.0

        @jax.custom_vjp
        def tap(losses, counting):
            return losses

        def fwd(losses, counting):
            # A zero taken from the losses: under vmap (a pair of gradients in one
            # program) it is mapped, and the callback fires once per member.
            return losses, (losses.shape[0], counting, jnp.sum(losses[:0]))

        def bwd(residuals, cotangent):
            n, counting, zero = residuals

            def add():
                jax.debug.callback(self._add, n / self.batch_size + zero)

            jax.lax.cond(counting, add, lambda: None)
            return cotangent, None

        tap.defvjp(fwd, bwd)
        self.tap = tap

    def _add(self, amount: float) -> None:
        self.value += float(amount)

    def take(self) -> float:
        """Waits for pending callbacks, returns the count and resets it."""
        jax.effects_barrier()
        value, self.value = self.value, 0.0
        return value


class Setup:
    """What every method of one comparison shares: data, model, base optimizer, metrics.

    Args:
      dataset: a name of :data:`sam_optax.compare.DATASETS`.
      label_noise: the fraction of training labels flipped.
      steps: training steps per run.
      batch_size: examples per step.
      base: a name of :data:`BASES`.
    """

    def __init__(
        self, dataset: str, label_noise: float, steps: int, batch_size: int, base: str
    ) -> None:
        data = load_dataset(dataset, label_noise=label_noise)
        self.n_train = data["x_train"].shape[0]
        if batch_size > self.n_train:
            raise ValueError(
                f"batch size must be at most {self.n_train} for {dataset}, got {batch_size}"
            )
        self.steps, self.batch_size, self.base = steps, batch_size, check_base(base)
        self.arrays = {k: jnp.asarray(v) for k, v in data.items()}
        self.model = make_model(dataset)
        self.base_tx, self.schedule = self.base.build(steps)
        self.counter = _GradCounter(batch_size)
        self.chunk = max(1, -(-steps // CURVE_POINTS))
        self.bounds = [*range(0, steps, self.chunk), steps]
        self.sharpness_batch = min(SHARPNESS_BATCH, self.n_train)
        # The timing reuses the compiled training chunk, with the counter switched off.
        self.timing_order = batch_order(self.n_train, batch_size, self.chunk, seed=0)
        a = self.arrays
        sharp = (a["x_train"][: self.sharpness_batch], a["y_train"][: self.sharpness_batch])

        # The data are arguments, not constants captured by jit: XLA would fold them in.
        @jax.jit
        def evaluate(params, x, y):
            logits = self.model.apply({"params": params}, x)
            return jnp.mean(jnp.argmax(logits, -1) == y)

        @jax.jit
        def final_metrics(params, x, y, x_sharp, y_sharp):
            loss = jnp.mean(self.xent(params, x, y))
            lam = hessian_top_eigenvalue(
                lambda p: jnp.mean(self.xent(p, x_sharp, y_sharp)), params, key=jax.random.key(0)
            )
            return loss, lam

        # Test accuracy; training loss over the whole training set and top Hessian eigenvalue.
        self.evaluate: Callable[[Any], jax.Array] = lambda params: evaluate(
            params, a["x_test"], a["y_test"]
        )
        self.final_metrics: Callable[[Any], tuple[jax.Array, jax.Array]] = lambda params: (
            final_metrics(params, a["x_train"], a["y_train"], *sharp)
        )

    def xent(self, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        """Per-example cross-entropy of the model."""
        logits = self.model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    def train_chunk(
        self,
        state: Any,
        x: jax.Array,
        y: jax.Array,
        order: jax.Array,
        counting,
        loss_term: Callable[..., jax.Array] | None = None,
        uses_gradient: bool = True,
    ):
        """``lax.scan`` of training steps over the batches ``order`` (not jitted here).

        ``loss_term`` and ``uses_gradient`` are the method's
        :attr:`sam_optax.registry.Method.loss_term` and
        :attr:`~sam_optax.registry.Method.uses_gradient`.
        """
        from sam_optax.flax import linen_step

        tap = self.counter.tap

        def apply(params, inputs):
            return self.model.apply({"params": params}, inputs)

        def loss_fn(opt_state, batch):
            def loss(logits):
                labels = batch[1]
                xent = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
                value = jnp.mean(tap(xent, counting))
                if loss_term is not None:
                    value = value + loss_term(opt_state, apply, batch[0], logits)
                return value

            return loss

        def per_example_loss_fn(params, batch):
            return tap(self.xent(params, *batch), counting)

        def body(state, idx):
            batch = (x[idx], y[idx])
            return linen_step(
                state,
                loss_fn(state.opt_state, batch),
                batch[0],
                update_kwargs={"per_example_loss_fn": per_example_loss_fn, "batch": batch},
                clean_gradient=uses_gradient,
            )

        return jax.lax.scan(body, state, order)


def train(
    setup: Setup, spec: MethodSpec, seeds: int, advance: Callable[[int, str], None]
) -> tuple[dict[str, Any], TimedRun]:
    """Trains ``spec`` for each seed; returns its result row and its timed chunk.

    Seeds change the initialisation and the batch order; every method sees the
    same batches for a given seed. Each run is one compiled ``lax.scan`` per curve
    point. Seeds are not ``vmap``-ed: under ``vmap`` a skipped probe would run anyway.

    Args:
      setup: the comparison's shared :class:`Setup`.
      spec: the method and its overrides.
      seeds: the number of seeds.
      advance: ``(steps, description) -> None``, called as training advances.

    Returns:
      ``(row, timed)``: the row (see :class:`sam_optax.compare.CompareResult`,
      without the timing) and the compiled chunk, ready to be timed from the state
      the last seed ended in.
    """
    from sam_optax.flax import TrainState

    method = registry.METHODS[spec.name]
    base_tx = setup.base_tx
    if method.base_steps is not None:
        # A method that steps the base optimizer n times per training step gets a
        # learning-rate schedule n times as long, so that it decays over training.
        n = method.base_steps({**method.defaults, **spec.kwargs})
        base_tx, _ = setup.base.build(setup.steps * n)
    a = setup.arrays
    batch_like = jax.eval_shape(
        lambda: (a["x_train"][: setup.batch_size], a["y_train"][: setup.batch_size])
    )
    tx = spec.build(
        base_tx,
        learning_rate=setup.schedule,
        total_steps=setup.steps,
        num_data=setup.n_train,
        batch_like=batch_like,
    )
    jitted = jax.jit(
        functools.partial(
            setup.train_chunk, loss_term=method.loss_term, uses_gradient=method.uses_gradient
        )
    )
    counting = jnp.asarray(True)
    compiled: dict[int, Any] = {}
    compile_s = 0.0
    runs = []
    for seed in range(seeds):
        params = setup.model.init(jax.random.key(seed), a["x_train"][:1])["params"]
        state = TrainState.create(apply_fn=setup.model.apply, params=params, tx=tx)
        order = batch_order(setup.n_train, setup.batch_size, setup.steps, seed)
        curve = []
        setup.counter.take()
        for lo, hi in itertools.pairwise(setup.bounds):
            args = (a["x_train"], a["y_train"], order[lo:hi], counting)
            if hi - lo not in compiled:
                t0 = time.perf_counter()
                compiled[hi - lo] = jitted.lower(state, *args).compile()
                compile_s += time.perf_counter() - t0
            state, _ = compiled[hi - lo](state, *args)
            eval_params = (
                state.params
                if method.eval_params is None
                else method.eval_params(state.params, state.opt_state)
            )
            curve.append(float(setup.evaluate(eval_params)))
            advance(hi - lo, f"{spec.label}, seed {seed}")
        loss, lam = setup.final_metrics(eval_params)
        runs.append(
            {
                "test_acc": curve[-1],
                "train_loss": float(loss),
                "sharpness": float(lam),
                "grads_per_step": setup.counter.take() / setup.steps,
                "probe_fraction": probe_fraction(state.opt_state),
                "curve": curve,
            }
        )
    timed = TimedRun(
        spec.label,
        compiled[setup.chunk],
        state,
        (a["x_train"], a["y_train"], setup.timing_order, jnp.asarray(False)),
    )
    acc = np.array([r["test_acc"] for r in runs])
    row = {
        "method": spec.label,
        "name": spec.name,
        "overrides": {k: t for (k, _), t in zip(spec.overrides, spec.texts, strict=True)},
        "paper": method.paper,
        "test_acc_mean": float(acc.mean()),
        "test_acc_std": float(acc.std(ddof=1)) if seeds > 1 else 0.0,
        "test_acc": acc.tolist(),
        **{
            k: float(np.mean([r[k] for r in runs]))
            for k in ("train_loss", "sharpness", "grads_per_step", "probe_fraction")
        },
        "expected_grads_per_step": method.grads_per_step,
        "compile_s": compile_s,
        "curves": [r["curve"] for r in runs],
    }
    return row, timed
