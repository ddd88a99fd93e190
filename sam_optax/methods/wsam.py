"""WSAM: sharpness as a weighted regulariser, coupled (a front transformation) or decoupled."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _tree, _validate
from sam_optax.combines import weighted_sharpness
from sam_optax.methods.sam import Mask
from sam_optax.perturbations import normalized_gradient
from sam_optax.pieces import Policy
from sam_optax.skeleton import (
    ScalarOrSchedule,
    SharpnessAwareState,
    check_state,
    sharpness_aware,
)

PyTree = Any


def _weighted(
    rho: Any, gamma: Any, eps: Any, mask: Mask, axis_name: Any, policy: Any, name: str
) -> optax.GradientTransformationExtraArgs:
    return sharpness_aware(
        normalized_gradient(),
        weighted_sharpness(gamma),
        rho=rho,
        eps=eps,
        mask=mask,
        axis_name=axis_name,
        policy=policy,
        name=name,
    )


def wsam(
    rho: ScalarOrSchedule = 0.05,
    gamma: float | jax.Array = 0.9,
    *,
    eps: float | jax.Array = 1e-12,
    mask: Mask = None,
    axis_name: str | None = None,
    policy: Policy | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Weighted SAM, coupled form: chained in front of any base optimizer.

    The gradient of ``L(w) + alpha [L(w + e) - L(w)]``, ``alpha = gamma / (1 - gamma)``:

    .. math::

        e = \rho \, \frac{g}{\lVert g \rVert + \epsilon}, \qquad
        g_p = \mathrm{grad\_fn}(w + e), \qquad
        \mathrm{out} = g + \frac{\gamma}{1 - \gamma}\, (g_p - g)

    The base optimizer (momentum, Adam, weight decay) sees the whole of
    ``out``. ``gamma = 0.5`` is SAM exactly, ``gamma = 0`` the base optimizer.
    The paper's own mode, in which the sharpness term bypasses the base
    optimizer, is :func:`wsam_decoupled`. Two gradient evaluations per step.

    Args:
      rho: the perturbation radius, a number or an optax schedule.
      gamma: the weight of the sharpness, in ``[0, 1)`` (paper: 0.9, for its
        decoupled mode). Coupled, with SGD and momentum 0.9, the momentum buffer
        also integrates the sharpness term, ``9 (g_p - g)`` at 0.9, and training
        collapses; the registry's ``wsam_coupled`` uses 0.7 (MNIST-1D, 3 seeds:
        27.7 % test accuracy at 0.9, 93.9 % at 0.7, SGD 93.3 %; see the geometry
        docs page).
      eps: added to ``‖g‖``.
      mask: pytree of booleans (or a function of the params): leaves to perturb.
      axis_name: mapped axis over which the output is averaged.
      policy: when to probe (default: every step), e.g.
        ``sam_optax.policies.every(5)``; a skipped step returns ``g``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
      ``params`` and ``grad_fn``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda p: jnp.sum(p ** 4)
      >>> params = jnp.array([1.0, -0.5])
      >>> tx = optax.chain(sam_optax.wsam(rho=0.05, gamma=0.9), optax.sgd(0.01))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                            grad_fn=jax.grad(loss))
      >>> updates.shape
      (2,)

    Note:
      ``grad_fn(params) -> grads`` must return the gradient of the same
      minibatch loss as ``updates``.

    References:
      Yue et al., Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
      Regularization Term, KDD 2023, https://arxiv.org/abs/2305.15817
    """
    return _weighted(rho, gamma, eps, mask, axis_name, policy, "wsam")


class WSAMDecoupledState(NamedTuple):
    """State of :func:`wsam_decoupled`.

    Attributes:
      sharpness: the state of the coupled WSAM transformation that evaluates
        the probe; its ``count`` is the step at which ``learning_rate`` is
        evaluated (the updates taken before this one).
      base: the base optimizer's state.
    """

    sharpness: SharpnessAwareState
    base: PyTree


def wsam_decoupled(
    base_optimizer: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    rho: ScalarOrSchedule = 0.05,
    gamma: float | jax.Array = 0.9,
    *,
    eps: float | jax.Array = 1e-12,
    mask: Mask = None,
    axis_name: str | None = None,
    policy: Policy | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Weighted SAM, decoupled form (the paper's): wraps the base optimizer.

    The base optimizer steps on the clean gradient; the sharpness term is
    added to its update with the learning rate only, bypassing momentum, Adam
    and weight decay by design:

    .. math::

        e = \rho \, \frac{g}{\lVert g \rVert + \epsilon}, \quad
        g_p = \mathrm{grad\_fn}(w + e), \quad
        \alpha = \frac{\gamma}{1 - \gamma}, \quad
        \mathrm{out} = \mathrm{base}(g) - \mathrm{lr}_t\, \alpha\, (g_p - g)

    The probe is the coupled transformation :func:`wsam`; its output minus
    ``g`` (accumulated in float32) is the sharpness term. ``rho = 0`` is the
    base optimizer bit for bit; ``gamma = 0`` is it up to rounding.

    Args:
      base_optimizer: the optimizer that steps on the clean gradient (it
        receives every extra argument of ``update``, as in ``optax.chain``).
      learning_rate: the learning rate of the sharpness term, a number or an
        optax schedule of the step count; give the base optimizer's own.
      rho: the perturbation radius, a number or an optax schedule.
      gamma: the weight of the sharpness, in ``[0, 1)`` (paper: 0.9).
      eps: added to ``‖g‖``.
      mask: pytree of booleans (or a function of the params): leaves to perturb.
      axis_name: under ``pmap``/``shard_map``, the axis over which both the
        gradient that the base optimizer sees and the sharpness term are
        averaged.
      policy: when to probe (default: every step), e.g.
        ``sam_optax.policies.every(5)``; a skipped step returns ``g``.

    Returns:
      A complete optimizer, an ``optax.GradientTransformationExtraArgs`` whose
      ``update`` needs ``params`` and ``grad_fn``; its state is a
      :class:`WSAMDecoupledState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda p: jnp.sum(p ** 4)
      >>> params = jnp.array([1.0, -0.5])
      >>> lr = optax.cosine_decay_schedule(0.05, 100)
      >>> tx = sam_optax.wsam_decoupled(optax.sgd(lr, momentum=0.9), lr, rho=0.05, gamma=0.9)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                            grad_fn=jax.grad(loss))
      >>> params = optax.apply_updates(params, updates)
      >>> int(state.sharpness.count)
      1

    Note:
      ``grad_fn(params) -> grads`` must return the gradient of the same
      minibatch loss as ``updates``.

    References:
      Yue et al., Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
      Regularization Term, KDD 2023, https://arxiv.org/abs/2305.15817
    """
    if not (
        callable(getattr(base_optimizer, "init", None))
        and callable(getattr(base_optimizer, "update", None))
    ):
        raise ValueError(
            f"`base_optimizer` must be an optax GradientTransformation, got {base_optimizer!r}."
        )
    _validate.non_negative("learning_rate", learning_rate)
    probe = _weighted(rho, gamma, eps, mask, axis_name, policy, "wsam_decoupled")
    base = optax.with_extra_args_support(base_optimizer)

    def init_fn(params):
        return WSAMDecoupledState(sharpness=probe.init(params), base=base.init(params))

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
        if params is not None:  # without params, the probe below says what is missing
            check_state(state, jax.eval_shape(init_fn, params), "wsam_decoupled")
        # Integer leaves (float0 cotangents) get no sharpness term: their update passes through.
        floating = _tree.floating_flags(updates)
        g = _tree.as_float(updates, updates, floating)
        direction, s_state = probe.update(g, state.sharpness, params, grad_fn=grad_fn, **extra_args)
        if axis_name is not None:
            g = jax.lax.pmean(g, axis_name)
            updates = _tree.pass_through(g, updates, floating)
        base_updates, b_state = base.update(
            updates, state.base, params, grad_fn=grad_fn, **extra_args
        )
        count = state.sharpness.count
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        # Without a probe (rho_t = 0, or a policy's skip) the term is zero: select the
        # base update itself, so that the base trajectory is reproduced bit for bit.
        probed = s_state.probes > state.sharpness.probes
        out = jax.tree.map(
            lambda u, d, c, keep: (
                jnp.where(probed, u - lr * (d - c), u).astype(u.dtype) if keep else u
            ),
            base_updates,
            direction,
            g,
            jax.tree.unflatten(jax.tree.structure(g), floating),
        )
        return out, WSAMDecoupledState(sharpness=s_state, base=b_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
