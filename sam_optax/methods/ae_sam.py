"""AE-SAM and AE-LookSAM: probe only when the squared gradient norm is unusually large."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from sam_optax.combines import looksam_reuse
from sam_optax.perturbations import normalized_gradient
from sam_optax.policies import adaptive
from sam_optax.skeleton import ScalarOrSchedule, sharpness_aware

PyTree = Any
Mask = PyTree | Callable[[PyTree], PyTree] | None


def ae_sam(
    rho: ScalarOrSchedule = 0.05,
    *,
    total_steps: int,
    delta: float = 0.9,
    lambda1: float = -1.0,
    lambda2: float = 1.0,
    eps: float | jax.Array = 1e-12,
    mask: Mask = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AE-SAM: a SAM step when ``‖g‖²`` exceeds its running mean by ``c_t`` deviations.

    .. math::

        s = \lVert g\rVert^2, \quad
        \mu \leftarrow \delta\mu + (1-\delta)s, \quad
        \sigma^2 \leftarrow \delta\sigma^2 + (1-\delta)(s-\mu)^2, \quad
        c_t = \tfrac{t}{T}\lambda_1 + (1-\tfrac{t}{T})\lambda_2

        \mathrm{out} = \mathrm{grad\_fn}\Big(w + \rho\frac{g}{\lVert g\rVert+\epsilon}\Big)
        \text{ if } s \ge \mu + c_t\sigma, \quad \text{else } \mathrm{out} = g

    with ``mu_0 = s_0``, ``var_0 = 0`` (so step 0 probes); see
    :func:`sam_optax.policies.adaptive`. The probe sits in ``jax.lax.cond``: a
    skipped step costs one gradient evaluation (under ``jax.vmap`` both branches
    run). Under ``axis_name`` the statistic is averaged over devices, so every
    device makes the same decision. The defaults are **unverified** (no
    official code exists); with Gaussian ``s`` they probe on about half the steps.

    Args:
      rho: the perturbation radius, a number or an optax schedule.
      total_steps: ``T``, the number of training steps (required).
      delta: the EMA decay of the statistics, in ``[0, 1)``.
      lambda1: the threshold coefficient at the end of training.
      lambda2: the threshold coefficient at the start of training.
      eps: added to ``‖g‖``.
      mask: pytree of booleans (or a function of the params): leaves to perturb.
      axis_name: mapped axis over which the output and ``‖g‖²`` are averaged.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
      ``params`` and ``grad_fn``. ``state.policy`` holds ``mu`` and ``var``;
      ``state.probes / state.count`` is the probe fraction.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda p: jnp.sum(p ** 2)
      >>> tx = optax.chain(sam_optax.ae_sam(total_steps=20), optax.sgd(0.1))
      >>> @jax.jit
      ... def step(params, state):
      ...     updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                                grad_fn=jax.grad(loss))
      ...     return optax.apply_updates(params, updates), state
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(20):
      ...     params, state = step(params, state)
      >>> 0 < int(state[0].probes) < 20
      True

    References:
      Jiang et al., An Adaptive Policy to Employ Sharpness-Aware Minimization,
      ICLR 2023, https://arxiv.org/abs/2304.14647
    """
    return sharpness_aware(
        normalized_gradient(),
        policy=adaptive(total_steps, delta, lambda1, lambda2),
        rho=rho,
        eps=eps,
        mask=mask,
        axis_name=axis_name,
        name="ae_sam",
    )


def ae_looksam(
    rho: ScalarOrSchedule = 0.1,
    *,
    total_steps: int,
    alpha: float | jax.Array = 0.7,
    delta: float = 0.9,
    lambda1: float = -1.0,
    lambda2: float = 1.0,
    eps: float | jax.Array = 1e-12,
    layerwise: bool = False,
    mask: Mask = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AE-LookSAM: AE-SAM's trigger with LookSAM's reuse of the orthogonal gradient.

    A probing step (chosen by :func:`sam_optax.policies.adaptive`, as in
    :func:`ae_sam`) takes SAM's gradient and refreshes ``g_v``; the other steps
    reuse it, as in :func:`sam_optax.looksam`:

    .. math::

        \text{probe: } g_s = \mathrm{grad\_fn}(w + e), \;
        g_v = g_s - \frac{\langle g, g_s\rangle}{\lVert g\rVert^2+\epsilon}g, \;
        \mathrm{out} = g_s; \qquad
        \text{else: } \mathrm{out} = g + \alpha\frac{\lVert g\rVert}{\lVert g_v\rVert+\epsilon}g_v

    The probe sits in ``jax.lax.cond`` (under ``jax.vmap`` both branches run).
    The defaults are **unverified** (no official code exists).

    Args:
      rho: the perturbation radius (default 0.1, LookSAM's), a number or a schedule.
      total_steps: ``T``, the number of training steps (required).
      alpha: the weight of the reused ``g_v`` (LookSAM's paper: 0.7). With SGD
        and momentum 0.9 the registry uses 0.2 (MNIST-1D, 3 seeds: 83.4 % test
        accuracy at 0.7, SGD 93.3 %; 6 seeds: 92.5 / 93.4 / 93.0 / 93.5 / 94.1 %
        at 0.3 / 0.2 / 0.1 / 0.05 / 0, SGD 93.0 %). Smaller values gain more on
        clean labels and less on noisy ones (3 seeds, 40 % noise: 73.0 / 68.1 /
        66.1 % at 0.3 / 0.1 / 0; SGD 60.5 %); 0 reuses nothing, which is
        :func:`ae_sam` at this ``rho``.
      delta: the EMA decay of the statistics, in ``[0, 1)``.
      lambda1: the threshold coefficient at the end of training.
      lambda2: the threshold coefficient at the start of training.
      eps: added to every norm that is divided by.
      layerwise: decompose per leaf instead of over the whole tree.
      mask: pytree of booleans (or a function of the params): leaves to perturb.
      axis_name: mapped axis over which the output and ``‖g‖²`` are averaged.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
      ``params`` and ``grad_fn``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda p: jnp.sum(p ** 2)
      >>> tx = optax.chain(sam_optax.ae_looksam(total_steps=20), optax.sgd(0.1))
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                            grad_fn=jax.grad(loss))
      >>> int(state[0].probes)  # step 0 always probes and stores g_v
      1

    References:
      Jiang et al., An Adaptive Policy to Employ Sharpness-Aware Minimization,
      ICLR 2023, https://arxiv.org/abs/2304.14647

      Liu et al., Towards Efficient and Scalable Sharpness-Aware Minimization,
      CVPR 2022, https://arxiv.org/abs/2203.02714
    """
    return sharpness_aware(
        normalized_gradient(),
        looksam_reuse(alpha, layerwise=layerwise),
        adaptive(total_steps, delta, lambda1, lambda2),
        rho=rho,
        eps=eps,
        mask=mask,
        axis_name=axis_name,
        name="ae_looksam",
    )
