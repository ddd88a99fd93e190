"""One sharpness-aware training step for Flax NNX and Linen models.

Both helpers evaluate the loss once at ``w`` (the clean pass) and hand the
transformation a ``grad_fn`` that re-evaluates the same loss at any parameters
(the probe pass). The probe pass starts from the model state as it was before the
clean pass, so it sees the same dropout keys, and whatever it writes (BatchNorm
running statistics, RNG counters) is discarded: the model keeps the state of the
clean pass only, as in the official JAX SAM.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from flax.training import train_state

PyTree = Any


def _split_loss(out: Any, has_aux: bool) -> tuple[jax.Array, Any]:
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError("`loss_fn` with has_aux=True must return a pair (loss, aux).")
        return out
    return out, None


def nnx_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    loss_fn: Callable[..., Any],
    *args: Any,
    has_aux: bool = False,
    update_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    r"""Takes one training step of an NNX model with any ``sam_optax`` chain.

    With ``g = ∇_w L(w)`` from the clean pass and the probe
    ``grad_fn(w') = ∇_w L(w')`` evaluated from the pre-step model state,
    ``optimizer.update(model, g, grad_fn=grad_fn)`` applies the chain. BatchNorm
    statistics and RNG counters are taken from the clean pass only; both passes
    use the same dropout keys. Call it inside ``nnx.jit``.

    Args:
      model: the ``nnx.Module``, updated in place.
      optimizer: an ``nnx.Optimizer`` over ``model`` whose ``tx`` is a chain
        with a sharpness-aware transformation (any optax chain works).
      loss_fn: ``loss_fn(model, *args) -> loss`` (or ``(loss, aux)`` with
        ``has_aux=True``), called in training mode. It calls the model itself,
        unlike :func:`linen_step`'s, which takes the model's outputs.
      *args: passed to ``loss_fn`` (the batch, ...).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      update_kwargs: further keyword arguments for ``tx.update`` (e.g. ESAM's
        ``per_example_loss_fn`` and ``batch``).

    Returns:
      The loss of the clean pass, or ``(loss, aux)`` with ``has_aux=True``.

    Examples:
      >>> import jax.numpy as jnp, optax, sam_optax, sam_optax.flax
      >>> from flax import nnx
      >>> rngs = nnx.Rngs(0)
      >>> model = nnx.Sequential(nnx.Linear(3, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs),
      ...                        nnx.Linear(8, 1, rngs=rngs))
      >>> tx = optax.chain(sam_optax.sam(rho=0.05), optax.sgd(0.1))
      >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
      >>> def loss_fn(model, x, y):
      ...     return jnp.mean((model(x) - y) ** 2)
      >>> @nnx.jit
      ... def train_step(model, optimizer, x, y):
      ...     return sam_optax.flax.nnx_step(model, optimizer, loss_fn, x, y)
      >>> x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))
      >>> loss = train_step(model, optimizer, x, y)
      >>> int(optimizer.step[...])
      1

    References:
      Foret et al., Sharpness-Aware Minimization for Efficiently Improving
      Generalization, ICLR 2021, https://arxiv.org/abs/2010.01412
    """
    # Two filters give exactly two states; nnx.split's annotation cannot say so.
    graphdef, params, rest = nnx.split(model, optimizer.wrt, ...)  # type: ignore[misc]
    # The non-parameter state (BatchNorm statistics, RNG counters) enters each pass as
    # plain arrays, so that each pass merges fresh variables that it may mutate inside
    # its own trace; the probe's mutations are dropped, the clean pass's are kept.
    rest = nnx.as_pure(rest)

    def loss_at(p, r):
        m = nnx.merge(graphdef, p, r)
        loss, aux = _split_loss(loss_fn(m, *args), has_aux)
        return loss, (aux, nnx.as_pure(nnx.state(m, nnx.Not(optimizer.wrt))))

    value_and_grad = jax.value_and_grad(loss_at, has_aux=True)
    (loss, (aux, new_rest)), grads = value_and_grad(params, rest)

    def grad_fn(p):
        return value_and_grad(p, rest)[1]

    nnx.update(model, new_rest)
    optimizer.update(model, grads, grad_fn=grad_fn, **dict(update_kwargs or {}))
    return (loss, aux) if has_aux else loss


class TrainState(train_state.TrainState):
    """A Linen ``TrainState`` that also carries the model's mutable collections.

    Attributes:
      model_state: the non-parameter collections of the model (for example
        ``{"batch_stats": ...}``); empty for a model without any.
    """

    model_state: PyTree = struct.field(default_factory=dict)

    def variables(self, params: PyTree | None = None) -> dict[str, PyTree]:
        """The variables dict for ``apply_fn``: ``{'params': params, **model_state}``."""
        return {"params": self.params if params is None else params, **self.model_state}


def linen_step(
    state: TrainState,
    loss_fn: Callable[..., Any],
    *model_args: Any,
    rngs: Mapping[str, jax.Array] | None = None,
    has_aux: bool = False,
    update_kwargs: Mapping[str, Any] | None = None,
    clean_gradient: bool = True,
    **apply_kwargs: Any,
) -> tuple[TrainState, Any]:
    r"""Takes one training step of a Linen model with any ``sam_optax`` chain.

    Runs ``outputs = state.apply_fn(variables, *model_args, rngs=rngs,
    mutable=<model_state collections>, **apply_kwargs)`` and the loss
    ``loss_fn(outputs)`` at ``w`` (clean pass) and, through ``grad_fn``, at the
    perturbed parameters (probe pass, same ``rngs``, mutated collections
    discarded). Then ``tx.update(g, opt_state, w, grad_fn=grad_fn)`` and
    ``w ← w + updates``; ``model_state`` becomes the clean pass's.

    Args:
      state: a :class:`TrainState` (``model_state`` holds e.g. ``batch_stats``).
      loss_fn: ``loss_fn(outputs) -> loss`` (or ``(loss, aux)`` with
        ``has_aux=True``), where ``outputs`` is what the model returns: the
        helper applies the model, unlike :func:`nnx_step`, whose ``loss_fn``
        takes ``(model, *args)``.
      *model_args: positional arguments of ``apply_fn`` after the variables.
      rngs: PRNG keys for the model (e.g. ``{"dropout": key}``), used by both passes.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      update_kwargs: further keyword arguments for ``tx.update``.
      clean_gradient: whether to differentiate the clean pass. ``False`` for an
        optimizer that ignores its incoming updates and evaluates every gradient
        it uses through ``grad_fn`` (:func:`sam_optax.bsam`,
        :func:`sam_optax.sampa`): the clean pass is then forward only (the loss
        and the model state), and ``tx`` receives zeros as the updates. Under
        ``jit`` XLA removes an unused backward pass by itself, unless something
        in it has a side effect, such as a host callback.
      **apply_kwargs: keyword arguments of ``apply_fn`` (e.g. ``train=True``).

    Returns:
      ``(new_state, loss)``, or ``(new_state, (loss, aux))`` with ``has_aux=True``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax, sam_optax.flax
      >>> import flax.linen as nn
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train):
      ...         x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
      ...         return nn.Dense(1)(x)
      >>> x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))
      >>> variables = Net().init(jax.random.key(0), x, train=False)
      >>> state = sam_optax.flax.TrainState.create(
      ...     apply_fn=Net().apply, params=variables["params"],
      ...     model_state={"batch_stats": variables["batch_stats"]},
      ...     tx=optax.chain(sam_optax.sam(rho=0.05), optax.sgd(0.1)))
      >>> step = jax.jit(lambda s: sam_optax.flax.linen_step(
      ...     s, lambda out: jnp.mean((out - y) ** 2), x, train=True))
      >>> state, loss = step(state)
      >>> int(state.step)
      1

    References:
      Foret et al., Sharpness-Aware Minimization for Efficiently Improving
      Generalization, ICLR 2021, https://arxiv.org/abs/2010.01412
    """
    mutable = list(state.model_state) or False

    def loss_at(params):
        result = state.apply_fn(
            state.variables(params), *model_args, rngs=rngs, mutable=mutable, **apply_kwargs
        )
        outputs, new_model_state = result if mutable else (result, {})
        loss, aux = _split_loss(loss_fn(outputs), has_aux)
        return loss, (aux, new_model_state)

    if clean_gradient:
        (loss, (aux, new_model_state)), grads = jax.value_and_grad(loss_at, has_aux=True)(
            state.params
        )
    else:
        loss, (aux, new_model_state) = loss_at(state.params)
        grads = jax.tree.map(jnp.zeros_like, state.params)

    def grad_fn(p):
        return jax.grad(lambda q: loss_at(q)[0])(p)

    updates, opt_state = optax.with_extra_args_support(state.tx).update(
        grads, state.opt_state, state.params, grad_fn=grad_fn, **dict(update_kwargs or {})
    )
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        model_state=dict(new_model_state) if mutable else state.model_state,
    )
    return new_state, ((loss, aux) if has_aux else loss)
