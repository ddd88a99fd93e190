"""RWP and m-RWP: a mix of the clean gradient and the gradient at randomly perturbed weights."""

from __future__ import annotations

import jax
import optax

from sam_optax.combines import interpolate
from sam_optax.methods.sam import Mask
from sam_optax.perturbations import filterwise_gaussian
from sam_optax.pieces import Policy
from sam_optax.skeleton import ScalarOrSchedule, sharpness_aware


def rwp(
    rho: ScalarOrSchedule = 0.01,
    lam: float | jax.Array = 0.5,
    *,
    seed: int = 0,
    mask: Mask = None,
    axis_name: str | None = None,
    policy: Policy | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Random weight perturbation (RWP; m-RWP with ``rho=0.015``), in front of any base optimizer.

    With ``σ = rho`` and, per output filter ``f`` of each kernel (Flax: the last
    axis), Gaussian noise scaled by the filter's norm:

    .. math::

        e_f \sim \mathcal{N}\bigl(0, (\sigma \lVert w_f \rVert)^2\bigr), \qquad
        \mathrm{out} = (1 - \lambda)\, g + \lambda\, \mathrm{grad\_fn}(w + e)

    (vectors get :math:`\sigma (\lVert w \rVert + 10^{-16})` for the whole vector;
    see :func:`sam_optax.filterwise_gaussian` and :func:`sam_optax.interpolate`).
    ``e`` does not depend on ``g``, so the two gradients are independent and
    can run concurrently. ``rho = 0`` or ``lam = 0`` is the base optimizer
    exactly. Two gradient evaluations per step (one, in wall-clock, on two
    device groups).

    Data (a documented choice). The official code takes the clean and the noisy
    gradient on different data: on two GPUs, each on its own shard of ``-b``
    examples, mixed by the all-reduce. Here ``g`` is the incoming gradient and
    ``grad_fn`` evaluates wherever the caller binds it: to the same batch (as
    ``sam-optax compare`` does, the skeleton's contract), or, for the official
    split, pass ``g`` from one half of the batch and bind ``grad_fn`` to the
    other half (see the docs page "Two gradients at once").

    m-RWP (Li et al., TMLR 2024) is this update with its scripts' ``σ = 0.015``;
    RWP 2022's CIFAR scripts use ``σ = 0.01``, ImageNet ``0.005``; both use
    ``λ = 0.5``.

    Args:
      rho: ``σ``, the noise scale relative to each filter's norm (official RWP
        CIFAR scripts: 0.01), a number or an optax schedule.
      lam: ``λ``, the weight of the noisy gradient, in ``[0, 1]`` (0.5).
      seed: the seed of the noise key (the same on every device).
      mask: pytree of booleans (or a function of the params): leaves to
        perturb.
      axis_name: mapped axis over which the output is averaged.
      policy: when to probe (default: every step); a skipped step returns ``g``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
      ``params`` and ``grad_fn``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda p: jnp.sum(p["kernel"] ** 2)
      >>> params = {"kernel": jnp.array([[1.0, -0.5], [0.5, 2.0]])}
      >>> tx = optax.chain(sam_optax.rwp(rho=0.01, lam=0.5), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                            grad_fn=jax.grad(loss))
      >>> updates["kernel"].shape
      (2, 2)

    Note:
      ``grad_fn(params) -> grads`` evaluates the minibatch loss at the noisy
      weights: the same batch as ``updates``, or the other half of it for the
      official data split.

    References:
      Li et al., Efficient Generalization Improvement Guided by Random Weight
      Perturbation, arXiv 2022, https://arxiv.org/abs/2211.11489

      Li et al., Revisiting Random Weight Perturbation for Efficiently Improving
      Generalization, TMLR 2024, https://arxiv.org/abs/2404.00357
    """
    return sharpness_aware(
        filterwise_gaussian(seed=seed),
        interpolate(lam),
        rho=rho,
        mask=mask,
        axis_name=axis_name,
        policy=policy,
        name="rwp",
    )
