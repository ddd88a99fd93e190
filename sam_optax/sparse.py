r"""Sparse SAM's pieces: a perturbation restricted to a binary mask, and what builds the mask.

The mask ``M`` (one boolean per parameter entry) lives in the perturbation's state.
SSAM-F chooses it from the diagonal empirical Fisher, SSAM-D grows and prunes it as
training goes; :func:`fisher_mask` and :func:`set_sparse_mask` let a user compute it
elsewhere and install it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sam_optax import _tree, _validate
from sam_optax._state import find_state
from sam_optax.pieces import Perturbation
from sam_optax.probes import _explicit_spec, _whole
from sam_optax.skeleton import _fill, _prune

PyTree = Any

MODES = ("fisher", "dynamic")
SCORES = ("gradient", "weight", "random")


class SparseMaskState(NamedTuple):
    """State of :func:`sparse_mask_perturbation`.

    Attributes:
      mask: the binary mask ``M``, a boolean pytree with the structure of the params.
      key: the replicated PRNG key (``uint32[2]``) of SSAM-D's random scores.
      last: the step count of the last mask update (int32), ``-1`` before the first.
    """

    mask: PyTree
    key: jax.Array
    last: jax.Array


def kept_entries(size: int, sparsity: float) -> int:
    """``size - ceil(sparsity * size)``: how many of ``size`` entries the mask keeps.

    Computed exactly: ``floor((1 - s) * size)`` in floating point can fall one short
    (``(1 - 0.43) * 100 = 56.99...``).
    """
    return size - math.ceil(round(sparsity * size, 9))


def _eligible(tree: PyTree, flags: list[bool] | None) -> list[bool]:
    floating = _tree.floating_flags(tree)
    return floating if flags is None else [f and k for f, k in zip(floating, flags, strict=True)]


def _like(x: jax.Array, ref: jax.Array) -> jax.Array:
    """``x`` sharded as ``ref`` when ``ref`` is sharded over Explicit mesh axes."""
    spec = _explicit_spec(ref)
    return x if spec is None else jax.sharding.reshard(x, spec)


def _top(
    scores: list[jax.Array], eligible: list[bool], k: jax.Array | int, like: list[jax.Array]
) -> list[jax.Array]:
    """Boolean masks of the ``k`` largest entries over every eligible leaf together.

    Ranks (a stable double ``argsort``) instead of ``lax.top_k``, so that ``k`` may be
    traced; ties go to the earlier entry, and exactly ``min(k, size)`` entries are kept.
    The selection is global: under Explicit mesh axes the scores are gathered, and each
    mask leaf is sharded as the matching leaf of ``like``.
    """
    flat = [
        _whole(s).astype(jnp.float32).ravel()
        for s, keep in zip(scores, eligible, strict=True)
        if keep
    ]
    out, start = [], 0
    if flat:
        v = jnp.concatenate(flat)
        chosen = jnp.argsort(jnp.argsort(-v, stable=True), stable=True) < k
    for s, keep, ref in zip(scores, eligible, like, strict=True):
        if keep:
            out.append(_like(chosen[start : start + s.size].reshape(s.shape), ref))
            start += s.size
        else:
            out.append(jnp.zeros_like(ref, dtype=bool))
    return out


def _check_sparsity(sparsity: Any) -> None:
    _validate.not_static("sparsity", sparsity, "in [0, 1]")
    _validate.in_range("sparsity", sparsity, 0.0, 1.0)
    if callable(sparsity):
        raise ValueError(f"`sparsity` must be a number in [0, 1], got the callable {sparsity!r}.")


def _need(what: str) -> ValueError:
    return ValueError(
        f"sam_optax.ssam: the Fisher mask (mode='fisher' with update_every set) needs the "
        f"keyword argument `{what}` in `update`:\n"
        "    per_example_loss_fn = lambda p, batch: losses_of_shape_[B]\n"
        "    tx.update(grads, state, params, grad_fn=grad_fn,\n"
        "              per_example_loss_fn=per_example_loss_fn, batch=batch)\n"
        "Or compute the mask yourself with sam_optax.fisher_mask, install it with "
        "sam_optax.set_sparse_mask, and pass update_every=None."
    )


def _fisher(loss_fn: Callable, params: PyTree, batch: PyTree, num_samples: int | None) -> PyTree:
    """``Σ_n (∇ℓ_n)²`` over the first ``num_samples`` examples of ``batch`` (float32)."""
    _validate.function("per_example_loss_fn", loss_fn)
    shapes = [jnp.shape(x) for x in jax.tree.leaves(batch)]
    if not shapes or any(not shape or shape[0] != shapes[0][0] for shape in shapes):
        raise ValueError(
            "`batch` must be a pytree of arrays with one common leading (example) axis, got "
            f"leaves of shapes {shapes}."
        )
    size = shapes[0][0]
    n = size if num_samples is None else min(num_samples, size)
    # Gathered under Explicit mesh axes: the per-example gradients are sharded like the
    # params, and a mesh axis cannot shard both them and the examples' axis.
    examples = jax.tree.map(lambda x: _whole(x)[:n], batch)
    floating = _tree.floating_flags(params)

    def one(example):
        single = jax.tree.map(lambda x: x[None], example)

        def loss(p):
            losses = loss_fn(p, single)
            if jnp.shape(losses) != (1,):
                raise ValueError(
                    "sam_optax.ssam: `per_example_loss_fn` must give one loss per example: "
                    f"shape (1,) for a batch of one, got shape {jnp.shape(losses)}."
                )
            return jnp.sum(losses)

        grads = jax.grad(loss, allow_int=True)(params)
        return [
            jnp.square(jnp.abs(x)).astype(jnp.float32) if keep else jnp.zeros((), jnp.float32)
            for x, keep in zip(jax.tree.leaves(grads), floating, strict=True)
        ]

    squares = jax.vmap(one)(examples)
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten(
        [
            jnp.sum(s, axis=0) if keep else jnp.zeros(jnp.shape(w), jnp.float32)
            for s, w, keep in zip(squares, leaves, floating, strict=True)
        ]
    )


def fisher_mask(
    per_example_loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    sparsity: float = 0.2,
    *,
    num_samples: int | None = None,
) -> PyTree:
    r"""SSAM-F's mask: the entries of largest empirical Fisher information.

    .. math::

        F = \sum_{n=1}^{N_s} \bigl(\nabla \ell_n(w)\bigr)^2, \qquad
        M = \operatorname{top}_K(F), \quad K = P - \lceil s P \rceil

    over all ``P`` floating entries of the params together. Each ``∇ℓ_n`` is the
    gradient of ``per_example_loss_fn(params, example)`` on a batch of one example
    (vectorised with ``vmap``; ``N_s × P`` floats of memory). A model with
    BatchNorm should evaluate it in inference mode: a batch of one has no batch
    statistics.

    Args:
      per_example_loss_fn: ``(params, batch) -> [B]`` losses.
      params: the parameters at which the Fisher is taken.
      batch: a pytree whose leaves have the leading axis ``B``.
      sparsity: the fraction ``s`` of entries left out of the mask, in ``[0, 1]``.
      num_samples: the examples used, the first ones of ``batch`` (default and
        at most ``B``).

    Returns:
      A boolean pytree with the structure of ``params`` (``False`` on integer leaves),
      ready for :func:`set_sparse_mask`.

    Examples:
      >>> import jax.numpy as jnp, sam_optax
      >>> per_example = lambda p, b: (b["x"] @ p - b["y"]) ** 2
      >>> batch = {"x": jnp.array([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0]]), "y": jnp.ones(2)}
      >>> sam_optax.fisher_mask(per_example, jnp.zeros(3), batch, sparsity=0.5).tolist()
      [True, False, False]

    References:
      Mi et al., Make Sharpness-Aware Minimization Stronger: A Sparsified
      Perturbation Approach, NeurIPS 2022, https://arxiv.org/abs/2210.05177
    """
    _check_sparsity(sparsity)
    if num_samples is not None:
        _validate.integer("num_samples", num_samples, 1, static=True)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not hasattr(leaf, "shape"):
            raise ValueError(
                f"`params` leaves must be arrays, got {leaf!r} at {jax.tree_util.keystr(path)}."
            )
    scores = jax.tree.leaves(_fisher(per_example_loss_fn, params, batch, num_samples))
    eligible = _tree.floating_flags(params)
    size = sum(s.size for s, keep in zip(scores, eligible, strict=True) if keep)
    chosen = _top(scores, eligible, kept_entries(size, sparsity), jax.tree.leaves(params))
    return jax.tree.unflatten(jax.tree.structure(params), chosen)


def set_sparse_mask(opt_state: Any, mask: PyTree) -> Any:
    """Installs ``mask`` as the sparse perturbation's mask inside ``opt_state``.

    For a mask computed outside the optimizer (e.g. :func:`fisher_mask` on other
    examples); pass ``update_every=None`` to :func:`sam_optax.ssam` so that the
    method does not replace it.

    Args:
      opt_state: an optimizer state that holds one :class:`SparseMaskState`.
      mask: a pytree of booleans with the structure and shapes of the params.

    Returns:
      ``opt_state`` with the new mask.

    Examples:
      >>> import jax.numpy as jnp, optax, sam_optax
      >>> tx = optax.chain(sam_optax.ssam(update_every=None), optax.sgd(0.1))
      >>> state = sam_optax.set_sparse_mask(tx.init(jnp.zeros(3)), jnp.array([True, False, True]))
      >>> state[0].perturbation.mask.tolist()
      [True, False, True]

    References:
      Mi et al., Make Sharpness-Aware Minimization Stronger: A Sparsified
      Perturbation Approach, NeurIPS 2022, https://arxiv.org/abs/2210.05177
    """
    old = find_state(opt_state, SparseMaskState, "set_sparse_mask")
    want = jax.tree.structure(old.mask)
    got = jax.tree.structure(mask)
    if want != got:
        raise ValueError(
            f"sam_optax.set_sparse_mask: `mask` must have the structure of the params: "
            f"expected {want}, got {got}."
        )
    for a, b in zip(jax.tree.leaves(old.mask), jax.tree.leaves(mask), strict=True):
        if jnp.shape(a) != jnp.shape(b) or jnp.result_type(b) != jnp.bool_:
            raise ValueError(
                "sam_optax.set_sparse_mask: `mask` leaves must be boolean arrays of the "
                f"params' shapes: expected bool{list(jnp.shape(a))}, got "
                f"{jnp.result_type(b)}{list(jnp.shape(b))}."
            )
    new = old._replace(mask=jax.tree.map(jnp.asarray, mask))
    return jax.tree.map(
        lambda node: new if node is old else node,
        opt_state,
        is_leaf=lambda node: node is old,
    )


def _score(kind: str, g: jax.Array, w: jax.Array, key: jax.Array) -> jax.Array:
    if kind == "gradient":
        return jnp.abs(g)
    if kind == "weight":
        return jnp.abs(w).astype(jnp.float32)
    return _like(jax.random.uniform(key, jnp.shape(g)), g)


def sparse_mask_perturbation(
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
) -> Perturbation:
    r"""Sparse SAM's perturbation: SAM's ``e`` on the entries of a binary mask only.

    .. math::

        e = \rho \, \frac{g}{\lVert g \rVert + \epsilon} \odot M

    with the norm of the *full* gradient (official code), so ``‖e‖ ≤ rho``. ``M``
    keeps ``K = P - ⌈sP⌉`` of the ``P`` entries of the perturbed leaves; it is
    replaced on the first step and then every ``update_every`` steps (counted with
    the skeleton's step count, so a step that a policy skips delays the update to
    the next probe):

    - ``mode="fisher"`` (SSAM-F), before ``e`` is formed: ``M = top_K(F)``, with
      ``F = Σ_n (∇ℓ_n(w))²`` over the first ``min(num_samples, B)`` examples of the
      batch (see :func:`fisher_mask`). ``update`` then needs the keyword arguments
      ``per_example_loss_fn(params, batch) -> [B]`` and ``batch``.
    - ``mode="dynamic"`` (SSAM-D), after ``e`` is formed (the new mask is used
      from the next step on), with ``d = drop_rate (1 + cos(π t / T)) / 2``: grow
      ``n = min(K - ⌊K (1 - d)⌋, P - K)`` entries outside ``M`` of largest growth
      score and keep the ``K - n`` entries of ``M`` of largest death score, so
      that ``M`` always holds ``K`` entries. The first mask, ``K`` random entries,
      is drawn on the first step.

    With ``update_every=None`` the mask is never recomputed: SSAM-D keeps its first
    random mask, SSAM-F's stays all ``False`` (the base optimizer) until
    :func:`set_sparse_mask` installs one.

    Args:
      sparsity: the fraction ``s`` of entries left out, a Python number in ``[0, 1]``.
      update_every: steps between mask updates, or ``None``.
      mode: ``"fisher"`` or ``"dynamic"``.
      num_samples: SSAM-F's examples per Fisher estimate (at most the batch size).
      drop_rate: SSAM-D's peak fraction of ``M`` replaced, in ``[0, 1]``.
      total_steps: SSAM-D's ``T``, the length of training (needed for ``dynamic``).
      death: SSAM-D's death score: ``"gradient"`` (``|g|``), ``"weight"`` (``|w|``
        at the unperturbed ``w``) or ``"random"``.
      growth: SSAM-D's growth score, one of the same.
      seed: the seed of SSAM-D's key (replicated: the same on every device).

    Returns:
      A :class:`sam_optax.Perturbation` whose state is a :class:`SparseMaskState`.

    Examples:
      >>> import jax.numpy as jnp, sam_optax
      >>> from sam_optax.pieces import Context
      >>> piece = sam_optax.sparse_mask_perturbation(update_every=None)
      >>> state = piece.init(jnp.zeros(2))._replace(mask=jnp.array([True, False]))
      >>> e, _ = piece.perturb(jnp.array([3.0, 4.0]), state, Context(None, 0, 1.0, 0.0, None, {}))
      >>> e.tolist()  # the full gradient's norm: (3, 4) / 5, then masked
      [0.6000000238418579, 0.0]

    References:
      Mi et al., Make Sharpness-Aware Minimization Stronger: A Sparsified
      Perturbation Approach, NeurIPS 2022, https://arxiv.org/abs/2210.05177
    """
    _check_sparsity(sparsity)
    if update_every is not None:
        _validate.integer("update_every", update_every, 1, static=True)
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
    _validate.integer("num_samples", num_samples, 1, static=True)
    _validate.in_range("drop_rate", drop_rate, 0.0, 1.0)
    for name, value in (("death", death), ("growth", growth)):
        if value not in SCORES:
            raise ValueError(f"`{name}` must be one of {SCORES}, got {value!r}.")
    dynamic = mode == "dynamic"
    if dynamic and total_steps is None:
        raise ValueError(
            "`total_steps` must be given for mode='dynamic' (the drop rate follows a "
            "cosine over training), got None."
        )
    if total_steps is not None:
        _validate.integer("total_steps", total_steps, 1, static=True)
    horizon = 1 if total_steps is None else total_steps  # T, used by mode='dynamic' only
    _validate.integer("seed", seed, None, static=not isinstance(seed, jax.Array))

    def init(params):
        return SparseMaskState(
            jax.tree.map(lambda w: jnp.zeros_like(w, dtype=bool), params),
            jax.random.PRNGKey(seed),
            -jnp.ones([], jnp.int32),
        )

    def due(state, ctx):
        if update_every is None:
            return jnp.asarray(False)
        return (state.last < 0) | (ctx.count - state.last >= update_every)

    def first_mask(g, state, ctx):
        """SSAM-D's first mask, ``K`` random entries of the perturbed leaves, drawn on the
        first step (where the skeleton's mask is known) from the first half of the key."""
        leaves, treedef = jax.tree.flatten(g)
        eligible = _eligible(ctx.params, ctx.mask)
        size = sum(x.size for x, keep in zip(leaves, eligible, strict=True) if keep)

        def draw():
            keys = jax.random.split(jax.random.split(state.key)[0], len(leaves))
            scores = [jax.random.uniform(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
            return treedef.unflatten(_top(scores, eligible, kept_entries(size, sparsity), leaves))

        return jax.lax.cond(state.last < 0, draw, lambda: state.mask)

    def fisher_update(g, state, ctx):
        loss_fn = ctx.extra_args.get("per_example_loss_fn")
        batch = ctx.extra_args.get("batch")
        if loss_fn is None:
            raise _need("per_example_loss_fn")
        if batch is None:
            raise _need("batch")
        full = ctx.extra_args.get("full_params")
        eligible = _eligible(ctx.params, ctx.mask)

        def compute():
            if full is None:
                scores = _fisher(loss_fn, ctx.params, batch, num_samples)
            else:  # inside optax.partition: the Fisher of the whole model, cut to this part
                scores = _prune(_fisher(loss_fn, _fill(ctx.params, full), batch, num_samples), g)
            leaves = jax.tree.leaves(scores)
            size = sum(s.size for s, keep in zip(leaves, eligible, strict=True) if keep)
            chosen = _top(leaves, eligible, kept_entries(size, sparsity), jax.tree.leaves(g))
            return jax.tree.unflatten(jax.tree.structure(g), chosen)

        return jax.lax.cond(due(state, ctx), compute, lambda: state.mask)

    def dynamic_update(g, state, ctx):
        g_leaves, treedef = jax.tree.flatten(g)
        w_leaves = treedef.flatten_up_to(ctx.params)
        m_leaves = jax.tree.leaves(state.mask)
        eligible = _eligible(ctx.params, ctx.mask)
        size = sum(x.size for x, keep in zip(g_leaves, eligible, strict=True) if keep)
        kept = kept_entries(size, sparsity)

        def compute():
            t = jnp.asarray(ctx.count, jnp.float32)
            rate = drop_rate * (1.0 + jnp.cos(jnp.pi * t / horizon)) / 2.0
            drop = kept - jnp.floor(kept * (1.0 - rate)).astype(jnp.int32)
            # Grow at most the P - K entries outside M; keep the rest by death score,
            # so that M always holds K entries.
            k_grow = jnp.minimum(drop, size - kept)
            k_keep = kept - k_grow
            step_key = jax.random.fold_in(jax.random.split(state.key)[1], ctx.count)
            keys = jax.random.split(step_key, 2 * len(g_leaves))
            inside, outside = [], []
            for j, (x, w, m) in enumerate(zip(g_leaves, w_leaves, m_leaves, strict=True)):
                d = _score(death, x, w, keys[2 * j])
                r = _score(growth, x, w, keys[2 * j + 1])
                inside.append(jnp.where(m, d, -jnp.inf))
                outside.append(jnp.where(m, -jnp.inf, r))
            keep = _top(inside, eligible, k_keep, g_leaves)
            grow = _top(outside, eligible, k_grow, g_leaves)
            return treedef.unflatten(
                [(a & m) | (b & ~m) for a, b, m in zip(keep, grow, m_leaves, strict=True)]
            )

        return jax.lax.cond(due(state, ctx), compute, lambda: state.mask)

    def perturb(g, state, ctx):
        if dynamic:
            state = state._replace(mask=first_mask(g, state, ctx))
        elif update_every is not None:
            state = state._replace(mask=fisher_update(g, state, ctx))
        scale = ctx.rho / (_tree.global_norm(g) + ctx.eps)
        # A product, as the official code, not a select: a non-finite gradient entry
        # outside M still makes e non-finite (it propagates, it is never replaced).
        e = jax.tree.map(lambda x, m: scale * x * m.astype(x.dtype), g, state.mask)
        mask = dynamic_update(g, state, ctx) if dynamic and update_every is not None else state.mask
        fresh = due(state, ctx) | (dynamic & (state.last < 0))
        last = jnp.where(fresh, jnp.asarray(ctx.count, jnp.int32), state.last)
        return e, SparseMaskState(mask, state.key, last)

    return Perturbation(init, perturb)
