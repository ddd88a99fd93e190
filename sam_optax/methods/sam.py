"""SAM, ASAM and Fisher SAM: the probe-gradient methods that differ in how they climb."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from sam_optax.perturbations import adaptive_perturbation, fisher_perturbation, normalized_gradient
from sam_optax.pieces import Policy
from sam_optax.skeleton import ScalarOrSchedule, sharpness_aware

PyTree = Any
Mask = PyTree | Callable[[PyTree], PyTree] | None


def sam(
    rho: ScalarOrSchedule = 0.05,
    *,
    eps: float | jax.Array = 1e-12,
    mask: Mask = None,
    axis_name: str | None = None,
    policy: Policy | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Sharpness-Aware Minimization, chained in front of any base optimizer.

    .. math::

        e = \rho \, \frac{g}{\lVert g \rVert + \epsilon}, \qquad
        \mathrm{out} = \nabla L_B(w + e) = \mathrm{grad\_fn}(w + e)

    The base optimizer that follows in the chain sees ``out`` at the
    unperturbed ``w``. Two gradient evaluations per step.

    Args:
      rho: the perturbation radius (paper: 0.05 on CIFAR-10, 0.1 on CIFAR-100),
        a number or an optax schedule of the step count.
      eps: added to ``‖g‖``, so a zero gradient gives a zero perturbation.
      mask: a pytree of booleans with the structure of the params (or a
        function of the params returning one); only leaves marked ``True`` are
        perturbed and enter ``‖g‖``. Use it to exclude biases, or for SAM-ON.
      axis_name: under ``pmap``/``shard_map``, the axis over which the output is
        averaged. Pass the device-local gradient for m-sharpness (each device
        perturbs with its own gradient), or the all-reduced one for a global
        perturbation.
      policy: when to probe (default: every step). With a policy from
        :mod:`sam_optax.policies` (``every(k)`` for SAM every k steps,
        ``bernoulli(p)`` for RST, ``adaptive(T)`` for AE-SAM's rule) a skipped
        step returns ``g`` and costs one gradient evaluation.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
      ``params`` and the keyword argument ``grad_fn``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda p, x: jnp.mean((x @ p["w"] - 1.0) ** 2)
      >>> params, x = {"w": jnp.ones(3)}, jnp.eye(3)
      >>> tx = optax.chain(sam_optax.sam(rho=0.05), optax.sgd(0.1, momentum=0.9))
      >>> state = tx.init(params)
      >>> grads = jax.grad(loss)(params, x)
      >>> grad_fn = lambda p: jax.grad(loss)(p, x)  # same batch
      >>> updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
      >>> params = optax.apply_updates(params, updates)
      >>> int(state[0].probes)
      1

    Note:
      ``grad_fn(params) -> grads`` must return the gradient of the same
      minibatch loss (same data, same dropout key) as ``updates``. The
      official JAX code has no ``eps``: it returns NaN on a zero gradient.

    References:
      Foret et al., Sharpness-Aware Minimization for Efficiently Improving
      Generalization, ICLR 2021, https://arxiv.org/abs/2010.01412
    """
    return sharpness_aware(
        normalized_gradient(),
        policy=policy,
        rho=rho,
        eps=eps,
        mask=mask,
        axis_name=axis_name,
        name="sam",
    )


def asam(
    rho: ScalarOrSchedule = 0.5,
    eta: float | jax.Array = 0.01,
    *,
    adaptive_mask: Mask | bool = None,
    eps: float | jax.Array = 1e-12,
    mask: Mask = None,
    axis_name: str | None = None,
    policy: Policy | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adaptive SAM: a perturbation scaled by the magnitude of each weight.

    .. math::

        T = |w| + \eta \text{ (weight tensors)}, \quad T = 1 \text{ (biases and other
        vectors)}, \qquad e = \rho\,\frac{T^2 \odot g}{\lVert T \odot g\rVert + \epsilon},
        \qquad \mathrm{out} = \mathrm{grad\_fn}(w + e)

    This is the official form (SamsungLabs/ASAM), which applies ``T = |w| + eta``
    to the parameters that PyTorch names ``weight`` only. The weight tensors are
    chosen by :func:`sam_optax.adaptive_leaves` (Flax ``kernel``, ``embedding``,
    ``scale``; Haiku ``w``, ``embeddings``, ``scale``; other names when the leaf
    has two or more dimensions) unless ``adaptive_mask`` says otherwise.
    davda54/sam's ``adaptive=True`` (``T = |w|`` on every leaf) is exactly
    ``asam(rho, eta=0.0, adaptive_mask=True)``. ``rho`` is about ten times SAM's.

    Args:
      rho: the perturbation radius (paper: 0.5 on CIFAR-10, 1.0 on CIFAR-100),
        a number or an optax schedule. The registry uses 0.2: on the
        comparison's small CNN (MNIST-1D, 6 seeds) 0.5 ties SGD (92.9 % against
        93.0 %) and 0.2 gains (93.5 %); with 40 % noisy labels (3 seeds) 0.5
        scores 66.5 % and 0.2 64.7 % (SGD 60.5 %).
      eta: offset added to ``|w|`` (paper: 0.01).
      adaptive_mask: the leaves that get ``T = |w| + eta`` (the others get
        ``T = 1``): a pytree of booleans with the structure of the params, a
        function of the params returning one, ``True`` for every leaf, or
        ``None`` for the weight tensors (:func:`sam_optax.adaptive_leaves`).
      eps: added to the norm that is divided by.
      mask: pytree of booleans (or a function of the params): leaves to perturb.
      axis_name: mapped axis over which the output is averaged.
      policy: when to probe (default: every step); a skipped step returns ``g``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
      ``params`` and ``grad_fn``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda p: jnp.sum((p["kernel"] - 2.0) ** 2) + jnp.sum(p["bias"] ** 2)
      >>> params = {"kernel": jnp.ones(2), "bias": jnp.ones(1)}
      >>> tx = optax.chain(sam_optax.asam(rho=0.5), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                            grad_fn=jax.grad(loss))
      >>> sorted(updates)
      ['bias', 'kernel']

    Note:
      ``grad_fn(params) -> grads`` must return the gradient of the same
      minibatch loss as ``updates``.

    References:
      Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
      Learning of Deep Neural Networks, ICML 2021, https://arxiv.org/abs/2102.11600
    """
    return sharpness_aware(
        adaptive_perturbation(eta, adaptive_mask=adaptive_mask),
        policy=policy,
        rho=rho,
        eps=eps,
        mask=mask,
        axis_name=axis_name,
        name="asam",
    )


def fisher_sam(
    rho: ScalarOrSchedule = 0.1,
    eta: float | jax.Array = 1.0,
    *,
    eps: float | jax.Array = 1e-12,
    mask: Mask = None,
    axis_name: str | None = None,
    policy: Policy | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Fisher SAM: the ascent step measured in a diagonal Fisher geometry.

    Maximises :math:`e^\top g` subject to :math:`e^\top F e \le \rho^2` with the
    diagonal proxy ``F = 1 + eta g²``:

    .. math::

        e = \rho\,\frac{g / F}{\sqrt{\sum g^2 / F + \epsilon}}, \qquad
        \mathrm{out} = \mathrm{grad\_fn}(w + e)

    ``eta = 0`` gives SAM. **Unverified**: no official code exists; the proxy
    and the defaults follow reimplementations (see the Fisher SAM section of the
    documentation's core-family page).

    Args:
      rho: the perturbation radius (default 0.1), a number or an optax schedule.
      eta: weight of ``g²`` in the Fisher proxy (default 1.0).
      eps: added under the square root of the normaliser.
      mask: pytree of booleans (or a function of the params): leaves to perturb.
      axis_name: mapped axis over which the output is averaged.
      policy: when to probe (default: every step); a skipped step returns ``g``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
      ``params`` and ``grad_fn``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda p: jnp.sum(p ** 2)
      >>> params = jnp.array([1.0, 2.0])
      >>> tx = optax.chain(sam_optax.fisher_sam(rho=0.1, eta=1.0), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                            grad_fn=jax.grad(loss))
      >>> updates.shape
      (2,)

    Note:
      The gradient must be unscaled (loss scaling, accumulation) before it
      arrives: ``F`` depends on its magnitude.

    References:
      Kim et al., Fisher SAM: Information Geometry and Sharpness Aware
      Minimisation, ICML 2022, https://arxiv.org/abs/2206.04920
    """
    return sharpness_aware(
        fisher_perturbation(eta),
        policy=policy,
        rho=rho,
        eps=eps,
        mask=mask,
        axis_name=axis_name,
        name="fisher_sam",
    )
