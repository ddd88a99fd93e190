"""SSAM: Sparse SAM, the perturbation restricted to a Fisher (SSAM-F) or dynamic (SSAM-D) mask."""

from __future__ import annotations

import jax
import optax

from sam_optax.methods.sam import Mask
from sam_optax.pieces import Policy
from sam_optax.skeleton import ScalarOrSchedule, sharpness_aware
from sam_optax.sparse import sparse_mask_perturbation


def ssam(
    rho: ScalarOrSchedule = 0.05,
    sparsity: float = 0.2,
    update_every: int | None = 1950,
    *,
    mode: str = "fisher",
    num_samples: int = 1024,
    drop_rate: float | jax.Array = 0.5,
    total_steps: int | None = None,
    death: str = "gradient",
    growth: str = "random",
    seed: int = 0,
    eps: float | jax.Array = 1e-12,
    mask: Mask = None,
    axis_name: str | None = None,
    policy: Policy | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Sparse SAM: SAM's perturbation on a binary mask of the weights, SSAM-F or SSAM-D.

    .. math::

        e = \rho \, \frac{g}{\lVert g \rVert + \epsilon} \odot M, \qquad
        \mathrm{out} = \mathrm{grad\_fn}(w + e)

    with the norm of the full gradient (official code), so ``‖e‖ ≤ rho``. The mask
    ``M`` keeps ``K = P - ⌈sP⌉`` of the ``P`` entries of the perturbed leaves and is
    replaced on the first step and every ``update_every`` steps:

    - SSAM-F (``mode="fisher"``): ``M = top_K(Σ_n (∇ℓ_n(w))²)``, the diagonal
      empirical Fisher over ``min(num_samples, B)`` examples of the batch, computed
      at the current ``w`` before ``e`` and used from this step on. ``update``
      needs ``per_example_loss_fn(params, batch) -> [B]`` and ``batch``.
    - SSAM-D (``mode="dynamic"``): a random first mask; after forming ``e``, with
      ``d = drop_rate (1 + cos(π t / T)) / 2``, grow ``n = min(K - ⌊K (1 - d)⌋,
      P - K)`` entries outside ``M`` at random (``growth``) and keep the ``K - n``
      entries of ``M`` of largest ``|g|`` (``death``); used from the next step on.

    ``M = 1`` everywhere is SAM; ``M = 0`` is the base optimizer. The mask (bool,
    params-shaped) and a key live in the state. Two gradient evaluations per step,
    plus, for SSAM-F on a mask update, one per-example backward pass over
    ``min(num_samples, B)`` examples (``vmap``; that many params-sized float32
    copies of memory). The masks are dense: no compute is saved.

    Departures from the official code (PyTorch), all on purpose:

    - SSAM-F takes its examples from the current batch (the official code draws
      ``num_samples`` separate training examples, so at most ``B`` here), computes
      the mask at the current ``w`` on the update step and uses it at once. The
      official code starts from an all-zero mask (its first step is a plain base
      optimizer step) and computes each mask right after the update step, at the
      next ``w``, with the leftover probe gradient added to the first sample.
    - The Fisher passes call the user's ``per_example_loss_fn``, which updates no
      BatchNorm statistics (the official passes run in train mode on batches of
      one). Give it a loss in inference mode for a model with BatchNorm.
    - The mask always holds ``K = P - ⌈sP⌉`` entries. The official SSAM-D keeps
      ``⌊K (1 - d)⌋`` and grows at most ``⌊sP⌋``, so its mask shrinks whenever
      ``d (1 - s) > s`` (at its own defaults ``s = 0.2``, ``d = 0.5``: to 60 % of the
      entries at the first update), and its floors can lose one more entry.
    - SSAM-D's ``death="weight"`` reads the unperturbed ``w`` (the official code reads
      ``w + e``); ``eps`` is ``1e-12`` (official ``1e-7``).
    - ``update_every`` counts steps, not epochs; ``T = total_steps``.

    Args:
      rho: the perturbation radius (official default 0.05), a number or an optax
        schedule.
      sparsity: the fraction ``s`` of entries that are not perturbed, a Python
        number in ``[0, 1]`` (official default 0.2).
      update_every: steps between mask updates (default 1950: the official 5 epochs
        of CIFAR-10 at batch 128), or ``None`` to keep the first mask (SSAM-D) or
        the one installed with :func:`sam_optax.set_sparse_mask` (SSAM-F).
      mode: ``"fisher"`` (SSAM-F) or ``"dynamic"`` (SSAM-D).
      num_samples: SSAM-F's examples per Fisher estimate (official 1024; at most
        the batch size).
      drop_rate: SSAM-D's peak fraction of the mask replaced (official 0.5).
      total_steps: SSAM-D's length of training, for the cosine drop rate.
      death: SSAM-D's death score, ``"gradient"`` (official default),
        ``"weight"`` or ``"random"``.
      growth: SSAM-D's growth score, ``"random"`` (official default),
        ``"gradient"`` or ``"weight"``.
      seed: the seed of SSAM-D's key (replicated: the same on every device).
      eps: added to ``‖g‖``.
      mask: pytree of booleans (or a function of the params): leaves that may be
        perturbed; ``M`` is chosen among their entries.
      axis_name: mapped axis over which the output is averaged. The mask is built
        from the gradient passed in and must be the same on every device: pass
        the all-reduced gradient (or the same batch) when devices differ.
      policy: when to probe (default: every step); a skipped step returns ``g``
        and delays a due mask update to the next probe.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params``
      and ``grad_fn`` (and, for SSAM-F, ``per_example_loss_fn`` and ``batch``).

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> per_example = lambda p, b: (b["x"] @ p - b["y"]) ** 2
      >>> batch = {"x": jax.random.normal(jax.random.key(0), (8, 4)), "y": jnp.ones(8)}
      >>> loss = lambda p: jnp.mean(per_example(p, batch))
      >>> tx = optax.chain(sam_optax.ssam(rho=0.05, sparsity=0.5, update_every=10),
      ...                  optax.sgd(0.1))
      >>> params = jnp.zeros(4)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                            grad_fn=jax.grad(loss),
      ...                            per_example_loss_fn=per_example, batch=batch)
      >>> int(state[0].perturbation.mask.sum())  # K = 4 - ceil(0.5 * 4)
      2

    Note:
      ``grad_fn(params) -> grads`` must return the gradient of the same minibatch
      loss as ``updates``.

    References:
      Mi et al., Make Sharpness-Aware Minimization Stronger: A Sparsified
      Perturbation Approach, NeurIPS 2022, https://arxiv.org/abs/2210.05177
    """
    return sharpness_aware(
        sparse_mask_perturbation(
            sparsity,
            update_every,
            mode=mode,
            num_samples=num_samples,
            drop_rate=drop_rate,
            total_steps=total_steps,
            death=death,
            growth=growth,
            seed=seed,
        ),
        policy=policy,
        rho=rho,
        eps=eps,
        mask=mask,
        axis_name=axis_name,
        name="ssam",
    )
