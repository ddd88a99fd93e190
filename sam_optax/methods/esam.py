"""ESAM: stochastic weight perturbation and sharpness-sensitive data selection."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from sam_optax import _tree
from sam_optax.perturbations import normalized_gradient, stochastic_weight_perturbation
from sam_optax.pieces import Policy
from sam_optax.probes import sharpness_sensitive_data
from sam_optax.skeleton import ScalarOrSchedule, sharpness_aware

PyTree = Any
Mask = PyTree | Callable[[PyTree], PyTree] | None


def esam(
    rho: ScalarOrSchedule = 0.05,
    beta: float | jax.Array = 0.6,
    gamma: float = 0.5,
    *,
    groups: int = 1,
    eps: float | jax.Array = 1e-12,
    seed: int = 0,
    mask: Mask = None,
    axis_name: str | None = None,
    policy: Policy | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Efficient SAM: a randomly masked ascent, and a probe on the sharpest examples only.

    Stochastic weight perturbation (SWP), one bit per leaf redrawn every step:

    .. math::

        m_j \sim \mathrm{Bernoulli}(\beta), \qquad
        e = \frac{\rho}{\beta}\,\frac{m\odot g}{\lVert m\odot g\rVert + \epsilon}

    Sharpness-sensitive data selection (SDS), with per-example losses ``l_i``:

    .. math::

        S = \operatorname{top}_K\big(l_i(w+e) - l_i(w)\big), \quad
        K = \max(1, \mathrm{round}(\gamma B)), \quad
        \mathrm{out} = \nabla_w \Big[\tfrac{1}{K}\textstyle\sum_{i\in S} l_i\Big](w+e)

    ``beta = 1`` switches SWP off; ``gamma = 1`` switches SDS off (then
    ``out = grad_fn(w + e)``). With SDS the second backward pass runs on the
    ``K`` gathered examples only, so it costs ``gamma`` of a full one, plus
    two forward passes over the batch (one when ``losses`` is given). SWP saves
    no compute in JAX; it changes the perturbation only.

    ``update`` extra arguments: with ``gamma = 1``, ``grad_fn`` as for SAM. With
    ``gamma < 1``, ``per_example_loss_fn(params, batch) -> [B]`` and ``batch``
    (leaves with leading axis ``B``), and optionally ``losses`` (the clean
    per-example losses of the first pass); ``grad_fn`` is then not used.

    Args:
      rho: the perturbation radius (paper: 0.05), a number or an optax schedule.
      beta: the probability that a leaf is perturbed, in ``(0, 1]`` (paper 0.6;
        official code default 1).
      gamma: the fraction of the batch kept for the probe, a Python number in
        ``(0, 1]`` (``static_args``: ``K`` is a shape; paper 0.5, official code 1).
      groups: the number of equal slices of the batch that select their examples
        separately (:func:`sam_optax.sharpness_sensitive_data`): under ``jax.jit``
        with the batch sharded over ``n`` devices, ``groups=n`` keeps the
        selection and the probe's backward pass on each device.
      eps: added to the norm that is divided by.
      seed: the seed of the mask's key (kept in the state, replicated over devices).
      mask: pytree of booleans (or a function of the params): leaves that may be
        perturbed at all.
      axis_name: mapped axis over which the output is averaged. Each device
        selects its ``K`` examples from its local batch.
      policy: when to probe (default: every step); a skipped step returns ``g``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> per_example = lambda p, b: (b["x"] @ p - b["y"]) ** 2
      >>> batch = {"x": jax.random.normal(jax.random.key(0), (8, 3)), "y": jnp.ones(8)}
      >>> tx = optax.chain(sam_optax.esam(rho=0.05, beta=0.6, gamma=0.5), optax.sgd(0.1))
      >>> params = jnp.zeros(3)
      >>> state = tx.init(params)
      >>> losses = per_example(params, batch)  # the clean pass, reused by the selection
      >>> grads = jax.grad(lambda p: jnp.mean(per_example(p, batch)))(params)
      >>> updates, state = tx.update(grads, state, params, per_example_loss_fn=per_example,
      ...                            batch=batch, losses=losses)
      >>> updates.shape
      (3,)

    References:
      Du et al., Efficient Sharpness-aware Minimization for Improved Training of
      Neural Networks, ICLR 2022, https://arxiv.org/abs/2110.03141
    """
    swp_off = _tree.is_python_number(beta) and beta == 1
    perturbation = (
        normalized_gradient() if swp_off else stochastic_weight_perturbation(beta, seed=seed)
    )
    # Validates gamma and groups; gamma = 1 switches SDS off.
    probe = sharpness_sensitive_data(gamma, groups=groups)
    return sharpness_aware(
        perturbation,
        policy=policy,
        rho=rho,
        eps=eps,
        mask=mask,
        axis_name=axis_name,
        name="esam",
        probe=None if gamma == 1 else probe,
    )
