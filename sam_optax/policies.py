"""Policies: when a sharpness-aware method takes its second gradient.

A policy returns either a Python ``True`` (probe on every step, no branch is
built) or a boolean scalar array; in the latter case the skeleton puts the probe
in ``jax.lax.cond``, so a skipped step does not run the second forward/backward
pass. The decision is made from quantities that are identical on every device
(the step count, statistics averaged over ``axis_name``, a replicated key).

Note:
  Under ``jax.vmap`` (a batched predicate) ``lax.cond`` becomes ``lax.select``:
  both branches run and nothing is saved. Map over devices with ``pmap`` or
  ``shard_map`` instead, or keep the decision unbatched.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _tree, _validate
from sam_optax.pieces import Policy, empty_init

PyTree = Any


def always() -> Policy:
    """The policy of the full methods: probe on every step.

    The decision is a Python ``True``, so no ``lax.cond`` is built and the
    probe is part of the straight-line program.

    Examples:
      >>> import sam_optax
      >>> policy = sam_optax.policies.always()
      >>> policy.decide(None, policy.init(None), None)[0]
      True

    References:
      Foret et al., Sharpness-Aware Minimization for Efficiently Improving
      Generalization, ICLR 2021, https://arxiv.org/abs/2010.01412
    """

    def decide(g, state, ctx):
        del g, ctx
        return True, state

    return Policy(empty_init, decide)


def every(k: int) -> Policy:
    r"""Probe every ``k`` steps: SAM on steps ``t`` with ``t mod k == 0`` (``t = 0`` included).

    .. math::

        \mathrm{probe}_t = [\, t \bmod k = 0 \,]

    This is the periodic switching baseline (MosaicML Composer's ``interval``)
    and LookSAM's schedule. ``every(1)`` reproduces the full method. The
    decision depends on the step count only, so it is the same on every device.
    Under ``jax.vmap`` ``lax.cond`` becomes ``select`` and both branches run.

    Args:
      k: the period, a Python int ``>= 1`` (a ``static_args`` structural value).

    Returns:
      A :class:`sam_optax.Policy` with an empty state.

    Examples:
      >>> import jax.numpy as jnp, sam_optax
      >>> from sam_optax.pieces import Context
      >>> policy = sam_optax.policies.every(3)
      >>> [bool(policy.decide(None, policy.init(None),
      ...                     Context(None, jnp.int32(t), 0.05, 1e-12, None, {}))[0])
      ...  for t in range(5)]
      [True, False, False, True, False]

    References:
      Liu et al., Towards Efficient and Scalable Sharpness-Aware Minimization,
      CVPR 2022, https://arxiv.org/abs/2203.02714
    """
    k = _validate.integer("k", k, 1, static=True)

    def decide(g, state, ctx):
        del g
        return jnp.asarray(ctx.count) % k == 0, state

    return Policy(empty_init, decide)


class BernoulliState(NamedTuple):
    """State of :func:`bernoulli`: the replicated PRNG key (raw ``uint32[2]``)."""

    key: jax.Array


def bernoulli(p: float | jax.Array | optax.Schedule = 0.5, *, seed: int = 0) -> Policy:
    r"""Probe at random with probability ``p(t)``: RST / SS-SAM's Bernoulli trial.

    .. math::

        \mathrm{probe}_t \sim \mathrm{Bernoulli}(p(t))

    The key lives in the state; step ``t`` draws from ``fold_in(key, t)``, so a
    run resumed from a checkpoint draws the same decisions. Every device that
    initialises the state from the same ``seed`` draws the same decision, so the
    decision is identical on every device under ``pmap``/``shard_map``. Under
    ``jax.vmap`` ``lax.cond`` becomes ``select`` and both branches run.

    Args:
      p: the probe probability in ``[0, 1]``, a number or an optax schedule of
        the step count.
      seed: the seed of the key (replicated: use the same seed on every device).

    Returns:
      A :class:`sam_optax.Policy` whose state is a :class:`BernoulliState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda p: jnp.sum(p ** 2)
      >>> tx = sam_optax.sam(rho=0.05, policy=sam_optax.policies.bernoulli(0.5))
      >>> params = jnp.ones(3)
      >>> state = tx.init(params)
      >>> step = jax.jit(lambda s: tx.update(jax.grad(loss)(params), s, params,
      ...                                    grad_fn=jax.grad(loss))[1])
      >>> for _ in range(100):
      ...     state = step(state)
      >>> 30 < int(state.probes) < 70
      True

    References:
      Zhao et al., Randomized Sharpness-Aware Training for Boosting Computational
      Efficiency in Deep Learning (first titled SS-SAM), arXiv 2022,
      https://arxiv.org/abs/2203.09962
    """
    _validate.in_range("p", p, 0.0, 1.0)
    _validate.integer("seed", seed, None, static=True)

    def init(params):
        del params
        return BernoulliState(key=jax.random.PRNGKey(seed))

    def decide(g, state, ctx):
        del g
        p_t = p(ctx.count) if callable(p) else p
        return jax.random.uniform(jax.random.fold_in(state.key, ctx.count)) < p_t, state

    return Policy(init, decide)


class AdaptiveState(NamedTuple):
    """State of :func:`adaptive`: running mean and variance of ``‖g‖²``, in units of ``scale``.

    Attributes:
      mu: the running mean of ``‖g‖² / scale²`` (float32).
      var: the running variance of ``‖g‖² / scale²`` (float32).
      scale: a power of two (float32, 1 before the first step) that keeps the
        statistics near 1: the mean of ``‖g‖²`` is ``mu · scale²`` and its
        variance ``var · scale⁴``, which overflow float32 for ``‖g‖`` near 1e10.
    """

    mu: jax.Array
    var: jax.Array
    scale: jax.Array


def _power_of_two_above(x: jax.Array) -> jax.Array:
    """The smallest power of two ``>= x`` (for ``x > 0``; 1 for ``x = 0``)."""
    _, exponent = jnp.frexp(jnp.where(x > 0, x, 1.0))
    return jnp.where(x > 0, jnp.ldexp(jnp.ones_like(x), exponent), 1.0)


def adaptive(
    total_steps: int,
    delta: float = 0.9,
    lambda1: float = -1.0,
    lambda2: float = 1.0,
) -> Policy:
    r"""AE-SAM's rule: probe when ``‖g‖²`` is large against its running statistics.

    .. math::

        s_t = \lVert g_t \rVert^2, \quad
        \mu_t = \delta \mu_{t-1} + (1 - \delta) s_t, \quad
        \sigma^2_t = \delta \sigma^2_{t-1} + (1 - \delta)(s_t - \mu_t)^2

        c_t = \tfrac{t}{T} \lambda_1 + (1 - \tfrac{t}{T}) \lambda_2, \qquad
        \mathrm{probe}_t = [\, s_t \ge \mu_t + c_t \sigma_t \,]

    with ``mu_0 = s_0`` and ``var_0 = 0``, so step 0 probes. The statistics are
    stored divided by a power of two (``AdaptiveState.scale``), so they stay finite
    for any finite gradient and the decisions do not change when every gradient is
    multiplied by a constant. ``t / T`` is clipped
    at 1, so after ``total_steps`` the threshold stays at ``lambda1`` (a choice:
    the paper does not train past ``T``). Under ``axis_name`` the statistic is
    ``s = pmean(‖g_local‖²)``, so the decision is the same on every device. With
    a mask, ``s`` is still taken over every leaf. Under ``jax.vmap`` ``lax.cond``
    becomes ``select`` and both branches run. The defaults are **unverified** (no
    official code exists).

    Args:
      total_steps: ``T``, the number of training steps (a Python int >= 1).
      delta: the EMA decay of the statistics, in ``[0, 1)``.
      lambda1: the threshold coefficient at the end of training.
      lambda2: the threshold coefficient at the start of training.

    Returns:
      A :class:`sam_optax.Policy` whose state is an :class:`AdaptiveState`.

    Examples:
      >>> import jax.numpy as jnp, sam_optax
      >>> from sam_optax.pieces import Context
      >>> policy = sam_optax.policies.adaptive(total_steps=100)
      >>> state = policy.init(None)
      >>> for t, g in enumerate([1.0, 1.0, 3.0, 0.1]):
      ...     ctx = Context(None, jnp.int32(t), 0.05, 1e-12, None, {})
      ...     probe, state = policy.decide(jnp.array([g]), state, ctx)
      ...     print(t, bool(probe))
      0 True
      1 True
      2 True
      3 False

    References:
      Jiang et al., An Adaptive Policy to Employ Sharpness-Aware Minimization,
      ICLR 2023, https://arxiv.org/abs/2304.14647
    """
    total_steps = _validate.integer("total_steps", total_steps, 1, static=True)
    _validate.in_range("delta", delta, 0.0, 1.0, high_open=True)
    for arg, value in (("lambda1", lambda1), ("lambda2", lambda2)):
        _validate.in_range(arg, value)
        if callable(value) or isinstance(value, bool):
            raise ValueError(f"`{arg}` must be a number, got {value!r}.")

    def init(params):
        del params
        zero = jnp.zeros([], jnp.float32)
        return AdaptiveState(mu=zero, var=zero, scale=jnp.ones([], jnp.float32))

    def decide(g, state, ctx):
        norm = _tree.global_norm(g).astype(jnp.float32)
        if ctx.axis_name is not None:
            norm_max = jax.lax.pmax(norm, ctx.axis_name)
        else:
            norm_max = norm
        # The statistics are kept in units of a power of two near the largest of
        # sqrt(s), sqrt(mu) and var^(1/4): s, mu and var then stay below 1 whatever the
        # gradient's scale, and scaling every gradient by a constant scales the unit,
        # not the decision. Powers of two rescale without rounding.
        first = jnp.asarray(ctx.count) == 0
        reach = jnp.maximum(jnp.sqrt(state.mu), jnp.sqrt(jnp.sqrt(state.var))) * state.scale
        scale = _power_of_two_above(jnp.maximum(norm_max, jnp.where(first, 0.0, reach)))
        shrink = jnp.square(state.scale / scale)
        s = jnp.square(norm / scale)
        if ctx.axis_name is not None:
            s = jax.lax.pmean(s, ctx.axis_name)
        mu = jnp.where(first, s, delta * (state.mu * shrink) + (1.0 - delta) * s)
        var = jnp.where(
            first,
            0.0,
            delta * (state.var * jnp.square(shrink)) + (1.0 - delta) * jnp.square(s - mu),
        )
        frac = jnp.minimum(jnp.asarray(ctx.count, jnp.float32) / total_steps, 1.0)
        c = frac * lambda1 + (1.0 - frac) * lambda2
        probe = s >= mu + c * jnp.sqrt(var)
        return probe, AdaptiveState(
            mu=mu.astype(jnp.float32), var=var.astype(jnp.float32), scale=scale
        )

    return Policy(init, decide)
