"""Bayesian SAM: SAM as an Adam-like variational method that learns a Gaussian posterior."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _tree, _validate
from sam_optax._state import find_state
from sam_optax.distributed import _group_mean, _split
from sam_optax.skeleton import (
    ScalarOrSchedule,
    _check_probe,
    _missing,
    _on_whole_model,
    _whole_params,
    check_state,
)

PyTree = Any


class BSAMState(NamedTuple):
    """State of :func:`bsam`.

    Attributes:
      count: updates taken so far (int32); drives the schedules and the noise.
      key: the PRNG key (raw ``uint32[2]``); step ``t`` draws its noise from
        ``fold_in(key, t)``, so the key itself never changes.
      num_data: ``N``, the data-set size that sets the posterior's variance
        (float32 scalar), kept so that :func:`bsam_sample` samples with it.
      momentum: ``m``, the EMA of the perturbed gradients (params-shaped, in
        the params' accumulation dtype).
      precision: ``s``, the per-parameter precision scale (params-shaped, real,
        float32 or wider); the posterior is ``N(w, 1 / (N s))``.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    key: jax.Array
    num_data: jax.Array
    momentum: PyTree
    precision: PyTree


def _real_dtype(x: Any) -> jnp.dtype:
    """The real accumulation dtype of a leaf (float32 for bfloat16 and complex64)."""
    return jnp.finfo(_tree.accum_dtype(jnp.asarray(x).dtype)).dtype


def _normal_like(params: PyTree, key: jax.Array) -> PyTree:
    """One standard normal draw per entry, a key per leaf (complex leaves: E|z|² = 1)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [
            jax.random.normal(k, jnp.shape(x), _tree.accum_dtype(jnp.asarray(x).dtype))
            for k, x in zip(keys, leaves, strict=True)
        ]
    )


def _shift(params: PyTree, delta: PyTree) -> PyTree:
    """``params + delta``, added in the accumulation dtype, in the dtypes of ``params``."""
    return jax.tree.map(
        lambda w, d: (_tree.to_accum(w) + d).astype(jnp.asarray(w).dtype), params, delta
    )


def _sample(params: PyTree, key: jax.Array, num_data: jax.Array, precision: PyTree) -> PyTree:
    """``θ = w + z / sqrt(N s)`` with ``z`` drawn from ``key``; ``N = inf`` gives ``w``."""
    z = _normal_like(params, key)
    return _shift(
        params, jax.tree.map(lambda zi, s: zi * jax.lax.rsqrt(num_data * s), z, precision)
    )


def _need_batch(what: str, groups: int) -> ValueError:
    return ValueError(
        f"sam_optax.bsam: groups={groups} (a noise sample and a perturbation per group of the "
        f"batch) needs the keyword argument `{what}` in `update`:\n"
        "    per_example_loss_fn = lambda p, batch: losses_of_shape_[B]\n"
        "    tx.update(grads, state, params, per_example_loss_fn=per_example_loss_fn, "
        "batch=batch)\n"
        "(groups=1 needs only `grad_fn`)."
    )


def bsam(
    learning_rate: ScalarOrSchedule,
    num_data: float | jax.Array,
    rho: ScalarOrSchedule = 0.01,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    weight_decay: float | jax.Array = 2e-4,
    damping: float | jax.Array = 0.1,
    s_init: float | jax.Array = 1.0,
    *,
    groups: int = 1,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Bayesian SAM: an Adam-like optimizer of a Gaussian posterior's mean and precision.

    bSAM (Möllenhoff & Khan) fits a Gaussian posterior
    :math:`\mathcal N(w, \operatorname{diag}(1 / (N s)))` over the weights. Each
    step draws a sample of it, takes the gradient there, climbs from the mean
    along that gradient scaled by the precision, and descends along the
    gradient at the perturbed point. With :math:`k` = ``groups`` groups of the
    batch, each with its own data :math:`B_j` and noise :math:`z_j \sim \mathcal N(0, I)`:

    .. math::

        \theta_j = w_t + z_j / \sqrt{N s_t} \qquad
        g_j = \nabla L_{B_j}(\theta_j) \qquad
        e_j = \rho_t\, g_j / s_t \qquad
        \bar g = \tfrac1k \textstyle\sum_j \nabla L_{B_j}(w_t + e_j)\\
        m_{t+1} = \beta_1 m_t + (1 - \beta_1)(\bar g + \delta w_t) \qquad
        w_{t+1} = w_t - \alpha_t\, m_{t+1} / s_t\\
        s_{t+1} = \beta_2 s_t + (1 - \beta_2)
            \big(\tfrac1k \textstyle\sum_j \sqrt{s_t}\,|g_j| + \gamma + \delta\big)

    elementwise, with :math:`m_0 = 0`, :math:`s_0` = ``s_init``,
    :math:`\delta` = ``weight_decay`` (the prior precision divided by
    :math:`N`) and :math:`\gamma` = ``damping``. We follow the official JAX code
    (``build_bsam_optimizer``), where it fixes what a summary of the paper
    leaves open: the perturbation is not normalised and has no ``eps``; the
    weight step divides by the *old* :math:`s_t`; the precision is updated
    with the gradient at the noisy sample, not at the perturbed point; there is
    no bias correction. ``s_init > 0`` and ``damping + weight_decay > 0`` keep
    :math:`s` positive. Two gradient evaluations per step (the sample and the
    perturbed point), per group; the gradient at :math:`w` is never used.

    bSAM is its own optimizer, not a transformation in front of one: it is the
    last member of a chain, and ``rho = 0`` does not give a base optimizer but
    a noisy Adam-like method.
    With ``b2 = 1``, ``s_init = 1``, ``weight_decay = 0`` and no noise
    (``num_data = inf``) it is SAM without the normalisation of :math:`e`, with
    EMA momentum: :math:`w \leftarrow w - \alpha\,
    \mathrm{EMA}_{\beta_1}[\nabla L(w + \rho \nabla L(w))]`. Evaluate with the
    mean :math:`w` (the params themselves), or average predictions over
    samples of :func:`bsam_sample` (Bayesian model averaging).

    Args:
      learning_rate: :math:`\alpha`, a number or an optax schedule of the step
        count. It is divided by :math:`s`, which starts at ``s_init`` and tends
        to ``damping + weight_decay`` plus :math:`\sqrt{s}|g|` over about
        :math:`1 / (1 - \beta_2)` steps, so it sits on another scale than SGD's:
        the official CIFAR recipes use 0.5 (ResNet-18, CIFAR-10/100) and 0.25
        (TinyImageNet) with a linear warm-up over 5 epochs, then a cosine
        decay. The registry uses 2 with a cosine decay: on MNIST-1D (1000
        steps, 3 seeds) 0.5 underfits, 91.2 % against SGD's 93.3 % (62.0 %
        against 60.5 % with 40 % noisy labels), and 2 gains, 95.2 % (65.7 %);
        see the docs page *Bayesian*.
      num_data: :math:`N`, the size of the training set (the official code
        multiplies it by a factor of 4 for data augmentation on CIFAR). It
        scales the noise, :math:`1/\sqrt{N s}`; ``float('inf')`` switches the
        noise off.
      rho: :math:`\rho`, a number or an optax schedule (official CIFAR recipes:
        0.01; TinyImageNet 5e-5). It multiplies :math:`g / s`, on another scale
        than SAM's normalised radius.
      b1: :math:`\beta_1` in ``[0, 1)``, the momentum of the gradient.
      b2: :math:`\beta_2` in ``[0, 1]``, the momentum of the precision.
      weight_decay: :math:`\delta` = prior precision / :math:`N`, coupled: it
        enters both the momentum and the precision (official CIFAR-10 recipe:
        prior precision 40, :math:`N = 4 \times 50\,000`, so
        :math:`\delta = 2 \cdot 10^{-4}`, the default).
      damping: :math:`\gamma`, added to the precision (official: 0.1).
      s_init: :math:`s_0 > 0`, the initial precision (official: 1).
      groups: :math:`k`, the number of groups the batch is split into, each with
        its own noise and perturbation (the official code's ``--batchsplit``,
        8 in its recipes, emulates m-sharpness this way on one device). With
        ``groups > 1``, ``update`` needs ``per_example_loss_fn(params, batch)
        -> [B]`` and ``batch`` (the batch size a multiple of ``groups``)
        instead of ``grad_fn``. Note that :math:`s` averages :math:`|g_j|` over
        groups, which is at least :math:`|\bar g_j|`: changing ``groups``
        changes the precision, and with it the step size.
      seed: the seed of the noise's key (replicated: use the same seed on every
        device).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
      ``(updates, state, params, *, grad_fn, **extra_args)`` and **ignores
      ``updates``**: every gradient it uses is its own. Under ``jit``, the
      caller's clean backward pass is then dead code and is removed; only the
      forward pass of a logged loss remains. It takes no ``axis_name``: under
      ``jit`` with sharded arrays nothing is needed, and under ``pmap`` or
      ``shard_map`` ``grad_fn`` must return the all-reduced gradient.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda p: jnp.sum((p - 1.0) ** 2)
      >>> params = jnp.zeros(2)
      >>> tx = sam_optax.bsam(learning_rate=0.5, num_data=10_000, weight_decay=0.0)
      >>> state = tx.init(params)
      >>> for _ in range(200):
      ...     updates, state = tx.update(None, state, params, grad_fn=jax.grad(loss))
      ...     params = optax.apply_updates(params, updates)
      >>> bool(jnp.allclose(params, 1.0, atol=0.05))
      True
      >>> sample = sam_optax.bsam_sample(params, state, jax.random.key(1))  # θ ~ posterior
      >>> sample.shape
      (2,)

    Note:
      ``grad_fn(params) -> grads`` must evaluate the gradient of the same
      minibatch loss (same data, same dropout key) at any parameters; bSAM
      calls it at the noisy sample and at the perturbed point. Model state
      (BatchNorm statistics) is the caller's: :func:`sam_optax.flax.linen_step`
      keeps the clean pass's statistics, whereas the official code keeps those
      of the perturbed pass of the first group.

    References:
      Möllenhoff & Khan, SAM as an Optimal Relaxation of Bayes, ICLR 2023,
      https://arxiv.org/abs/2210.01620
    """
    _validate.non_negative("learning_rate", learning_rate)
    _validate.positive("num_data", num_data)
    _validate.non_negative("rho", rho)
    _validate.in_range("b1", b1, 0.0, 1.0, high_open=True)
    _validate.in_range("b2", b2, 0.0, 1.0)
    _validate.non_negative("weight_decay", weight_decay)
    _validate.non_negative("damping", damping)
    _validate.positive("s_init", s_init)
    if _tree.is_python_number(damping) and _tree.is_python_number(weight_decay):
        if damping + weight_decay <= 0:
            raise ValueError(
                f"`damping` + `weight_decay` must be > 0 (they keep the precision s positive), "
                f"got damping={damping!r} and weight_decay={weight_decay!r}."
            )
    groups = _validate.integer("groups", groups, 1, static=True)
    seed = _validate.integer("seed", seed, None, static=not isinstance(seed, jax.Array))

    def init_fn(params):
        _validate.floating_params("bsam", params)
        return BSAMState(
            count=jnp.zeros([], jnp.int32),
            key=jax.random.PRNGKey(seed),
            num_data=jnp.asarray(num_data, jnp.float32),
            momentum=_tree.zeros_like_accum(params),
            precision=jax.tree.map(
                lambda x: jnp.full_like(x, s_init, dtype=_real_dtype(x)), params
            ),
        )

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
        del updates  # every gradient bSAM uses is its own (see the docstring)
        if params is None:
            raise _missing("`params`", "bsam")
        full_params = _whole_params(params, extra_args, "bsam")
        check_state(state, jax.eval_shape(init_fn, params), "bsam")
        s, w = state.precision, _tree.to_accum(params)
        rho_t = rho(state.count) if callable(rho) else rho

        def at(grad_of, p):
            """The gradient at ``p`` (the whole model's, cut to these leaves), in m's dtypes."""
            g = _on_whole_model(grad_of, p, full_params)
            _check_probe(g, params, "bsam")
            return _tree.cast_like(_tree.to_accum(g), state.momentum)

        def one_group(key, grad_of):
            """``(g_p, sqrt(s)|g|)`` of one group: its noisy sample, then its perturbation."""
            g = at(grad_of, _sample(params, key, state.num_data, s))
            e = jax.tree.map(lambda gi, si: rho_t * gi / si, g, s)
            g_p = at(grad_of, _shift(params, e))
            return g_p, jax.tree.map(lambda gi, si: jnp.sqrt(si) * jnp.abs(gi), g, s)

        step_key = jax.random.fold_in(state.key, state.count)
        if groups == 1:
            if grad_fn is None:
                raise _missing("the keyword argument `grad_fn`", "bsam")
            _validate.function("grad_fn", grad_fn)
            g_p, g_s = one_group(jax.random.fold_in(step_key, 0), grad_fn)
        else:
            loss_fn, batch = extra_args.get("per_example_loss_fn"), extra_args.get("batch")
            if loss_fn is None:
                raise _need_batch("per_example_loss_fn", groups)
            if batch is None:
                raise _need_batch("batch", groups)
            leaves = jax.tree.leaves(batch)
            n = jnp.shape(leaves[0])[0] if leaves and jnp.ndim(leaves[0]) else groups
            if n % groups:
                raise ValueError(f"`groups`={groups} must divide the batch size {n}.")
            # _split refuses a batch without one shared leading axis.
            data = _split(batch, n // groups, "groups")
            keys = jax.vmap(lambda j: jax.random.fold_in(step_key, j))(jnp.arange(groups))

            def group(xs):
                key, part = xs
                grad_of = jax.grad(lambda p: jnp.mean(loss_fn(p, part)))
                return one_group(key, grad_of), ()

            (g_p, g_s), _ = _group_mean(group, (keys, data), sequential=False)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        m = jax.tree.map(
            lambda mi, gi, wi: b1 * mi + (1 - b1) * (gi + weight_decay * wi),
            state.momentum,
            g_p,
            w,
        )
        out = jax.tree.map(lambda mi, si: -lr * mi / si, m, s)  # the old s, as the official code
        new_s = jax.tree.map(
            lambda si, gs: b2 * si + (1 - b2) * (gs + damping + weight_decay), s, g_s
        )
        new_state = BSAMState(
            count=optax.safe_increment(state.count),
            key=state.key,
            num_data=state.num_data,
            momentum=m,
            precision=new_s,
        )
        return _tree.cast_like(out, params), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def bsam_sample(params: PyTree, opt_state: PyTree, key: jax.Array) -> PyTree:
    r"""One sample of a :func:`bsam` run's posterior, for Bayesian model averaging.

    .. math::

        \theta = w + z / \sqrt{N s}, \qquad z \sim \mathcal N(0, I)

    with the mean :math:`w` (the params), the precision :math:`s` and the
    :math:`N` of the state. Averaging the predicted probabilities of several
    samples is the paper's Bayesian model average (the official test script
    uses 32 samples); the params themselves give its "mean" predictions.

    Args:
      params: the params of the run (the posterior mean).
      opt_state: the optimizer state; :func:`bsam` may sit at any depth
        (``optax.chain``, ``optax.inject_hyperparams``).
      key: a JAX PRNG key; one key per sample.

    Returns:
      The sample, with the structure and dtypes of ``params``.

    Raises:
      ValueError: if ``opt_state`` holds no bSAM state (or more than one),
        ``key`` is not a PRNG key, or ``params`` do not have the structure of
        the state's.

    Examples:
      >>> import jax, jax.numpy as jnp, sam_optax
      >>> tx = sam_optax.bsam(learning_rate=0.5, num_data=100)
      >>> params = jnp.zeros(3)
      >>> state = tx.init(params)  # s = 1: the standard deviation is 1 / sqrt(100)
      >>> theta = sam_optax.bsam_sample(params, state, jax.random.key(0))
      >>> bool(jnp.all(jnp.abs(theta) < 0.5))
      True

    References:
      Möllenhoff & Khan, SAM as an Optimal Relaxation of Bayes, ICLR 2023,
      https://arxiv.org/abs/2210.01620
    """
    _validate.key("key", key)
    state = find_state(opt_state, BSAMState, "bsam_sample")
    want, got = jax.tree.structure(state.precision), jax.tree.structure(params)
    if want != got:
        raise ValueError(
            f"sam_optax.bsam_sample: `params` must have the structure of the params that the "
            f"state was initialised for: expected {want}, got {got}."
        )
    return _sample(params, key, state.num_data, state.precision)
