"""GSAM: SAM's probe gradient corrected along the surrogate gap, with its rho schedule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sam_optax import _tree, _validate
from sam_optax.combines import surrogate_gap
from sam_optax.methods.sam import Mask
from sam_optax.perturbations import normalized_gradient
from sam_optax.pieces import Policy
from sam_optax.skeleton import ScalarOrSchedule, sharpness_aware


def gsam(
    rho: ScalarOrSchedule = 0.05,
    alpha: float | jax.Array = 0.4,
    *,
    eps: float | jax.Array = 1e-12,
    mask: Mask = None,
    axis_name: str | None = None,
    policy: Policy | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Surrogate Gap Guided SAM, chained in front of any base optimizer.

    .. math::

        e = \rho_t \, \frac{g}{\lVert g \rVert + \epsilon}, \qquad
        g_p = \mathrm{grad\_fn}(w + e), \qquad
        g_\perp = g - \frac{\langle g, g_p \rangle}{\lVert g_p \rVert^2 + \epsilon}\, g_p,
        \qquad \mathrm{out} = g_p - \alpha\, g_\perp

    The step descends the perturbed loss along ``g_p`` and, orthogonally to
    it, the surrogate gap ``L(w + e) - L(w)``. ``alpha = 0`` is SAM. The paper
    ties ``rho`` to the learning rate: pass :func:`gsam_rho_schedule` as
    ``rho``. Two gradient evaluations per step.

    Args:
      rho: the perturbation radius, a number or an optax schedule of the step
        count (for the paper's schedule, :func:`gsam_rho_schedule`).
      alpha: the weight of the surrogate-gap direction (tuned per model in the
        paper: 0.01 for ResNet-50, 0.6 for ViT-B/32 on ImageNet). The default
        0.4 comes from the author's CIFAR example, which pairs it with an
        adaptive perturbation at ``rho = 2.0``; the recorded sweep supports it
        here too with the normalised perturbation at ``rho = 0.05`` (MNIST-1D,
        3 seeds: 93.8 % clean and 66.9 % with 40 % noisy labels, against SGD's
        93.3 % and 60.5 %).
      eps: added to ``‖g‖`` and to ``‖g_p‖²``.
      mask: pytree of booleans (or a function of the params): leaves to
        perturb; the decomposition uses these leaves only.
      axis_name: under ``pmap``/``shard_map``, the axis over which the output is
        averaged. The decomposition uses the gradients on each device (local
        ``g`` and ``g_p``) and the result is then averaged, as in both official
        codes.
      policy: when to probe (default: every step), e.g.
        ``sam_optax.policies.every(5)``; a skipped step returns ``g``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
      ``params`` and the keyword argument ``grad_fn``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda p: jnp.sum(p["w"] ** 4) + jnp.sum(p["b"] ** 2)
      >>> params = {"w": jnp.array([1.0, -0.5]), "b": jnp.array(0.3)}
      >>> lr = optax.linear_schedule(0.1, 0.0, 100)
      >>> rho = sam_optax.gsam_rho_schedule(lr, rho_max=0.04, rho_min=0.02,
      ...                                   lr_max=0.1, lr_min=0.0)
      >>> tx = optax.chain(sam_optax.gsam(rho=rho, alpha=0.4), optax.sgd(lr))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                            grad_fn=jax.grad(loss))
      >>> sorted(updates)
      ['b', 'w']

    Note:
      ``grad_fn(params) -> grads`` must return the gradient of the same
      minibatch loss (same data, same dropout key) as ``updates``.

    References:
      Zhuang et al., Surrogate Gap Guided Sharpness-Aware Minimization,
      ICLR 2022, https://arxiv.org/abs/2203.08065
    """
    return sharpness_aware(
        normalized_gradient(),
        surrogate_gap(alpha),
        rho=rho,
        eps=eps,
        mask=mask,
        axis_name=axis_name,
        policy=policy,
        name="gsam",
    )


def gsam_rho_schedule(
    lr_schedule: optax.ScalarOrSchedule,
    rho_max: float,
    rho_min: float,
    lr_max: float,
    lr_min: float,
) -> optax.Schedule:
    r"""GSAM's radius schedule: ``rho`` proportional to the learning rate, never negative.

    .. math::

        \rho_t = \max\Big(0,\ \rho_{\min} + (\rho_{\max} - \rho_{\min})
        \frac{\mathrm{lr}_t - \mathrm{lr}_{\min}}{\mathrm{lr}_{\max} - \mathrm{lr}_{\min}}\Big)

    and ``rho_t = rho_max`` when ``lr_max == lr_min``. The clamp matters during
    a warm-up whose learning rate starts below ``lr_min``: the line would go
    negative there. A step with ``rho_t = 0`` is a plain base-optimizer step.

    Args:
      lr_schedule: the base optimizer's learning-rate schedule (or a number).
      rho_max: the radius when the learning rate is ``lr_max``.
      rho_min: the radius when the learning rate is ``lr_min``.
      lr_max: the peak learning rate of ``lr_schedule``.
      lr_min: the final learning rate of ``lr_schedule``.

    Returns:
      An optax schedule ``count -> rho_t`` to pass as ``rho`` to :func:`gsam`
      (or to any other method).

    Examples:
      >>> import optax, sam_optax
      >>> lr = optax.warmup_cosine_decay_schedule(0.0, 1.0, 10, 100, end_value=0.1)
      >>> rho = sam_optax.gsam_rho_schedule(lr, rho_max=0.6, rho_min=0.02,
      ...                                   lr_max=1.0, lr_min=0.1)
      >>> [round(float(rho(t)), 4) for t in (0, 10, 100)]  # clamped at 0 in warm-up
      [0.0, 0.6, 0.02]

    References:
      Zhuang et al., Surrogate Gap Guided Sharpness-Aware Minimization,
      ICLR 2022, https://arxiv.org/abs/2203.08065
    """
    _validate.number_or_schedule("lr_schedule", lr_schedule)
    _validate.non_negative("rho_max", rho_max)
    _validate.non_negative("rho_min", rho_min)
    for name, value in (("lr_max", lr_max), ("lr_min", lr_min)):
        if not _tree.is_python_number(value):
            raise ValueError(f"`{name}` must be a number, got {value!r}.")
    _validate.non_negative("lr_min", lr_min)
    _validate.in_range("lr_max", lr_max, lr_min)

    def schedule(count):
        lr = lr_schedule(count) if callable(lr_schedule) else lr_schedule
        if lr_max == lr_min:
            rho = jnp.full(jnp.shape(lr), rho_max, jnp.float32)
        else:
            rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)
        return jnp.maximum(jnp.asarray(rho, jnp.float32), 0.0)

    return schedule
