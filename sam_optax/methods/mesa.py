"""Training for free: MESA's trajectory loss, its EMA teacher, and the EMA transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _tree, _validate
from sam_optax._state import find_state
from sam_optax.skeleton import check_state

PyTree = Any


def trajectory_kl(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: float | jax.Array = 5.0
) -> jax.Array:
    r"""The trajectory loss of SAF and MESA: a tempered KL divergence to a teacher.

    .. math::

        \mathrm{KL}_\tau(t, z) = \frac{\tau^2}{B} \sum_{i=1}^{B} \sum_c q_{ic}
        \big(\log q_{ic} - \log \mathrm{softmax}(z_i/\tau)_c\big),
        \qquad q_i = \mathrm{softmax}(t_i/\tau)

    with the teacher logits ``t`` behind a stop-gradient, so that the gradient
    with respect to one example's student logits is
    :math:`\tfrac{\tau}{B}\big(\mathrm{softmax}(z_i/\tau) - q_i\big)`. The
    softmaxes are ``log_softmax`` in float32 (the official code takes the log of
    a softmax). The :math:`\tau^2` factor and the direction (teacher first) are
    the official code's; it is 0 when ``t = z``.

    Args:
      student_logits: ``[..., C]`` logits of the model being trained; every
        leading axis is an example axis (the mean runs over all of them).
      teacher_logits: logits of the same shape: the EMA model's (MESA) or the
        logits recorded for the same samples some epochs earlier (SAF).
      temperature: ``tau > 0`` (the paper: 5).

    Returns:
      A float32 scalar.

    Examples:
      >>> import jax, jax.numpy as jnp, sam_optax
      >>> t = jnp.array([[jnp.log(3.0), 0.0]])
      >>> grad = jax.grad(sam_optax.trajectory_kl)(jnp.zeros((1, 2)), t, 1.0)
      >>> [round(float(v), 4) for v in grad[0]]
      [-0.25, 0.25]
      >>> float(sam_optax.trajectory_kl(t, t, 5.0))
      0.0

    References:
      Du et al., Sharpness-Aware Training for Free, NeurIPS 2022,
      https://arxiv.org/abs/2205.14083
    """
    _validate.positive("temperature", temperature)
    student_logits, teacher_logits = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
    if student_logits.ndim < 1 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "sam_optax.trajectory_kl: `student_logits` and `teacher_logits` must be arrays "
            f"[..., classes] of the same shape, got {student_logits.shape} and "
            f"{teacher_logits.shape}."
        )
    tau = jnp.asarray(temperature, jnp.float32)
    log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / tau, axis=-1)
    log_q = jax.nn.log_softmax(
        jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / tau, axis=-1
    )
    kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
    return tau**2 * jnp.mean(kl)


def ema_update(tree: PyTree, new: PyTree, decay: float | jax.Array) -> PyTree:
    r"""One exponential-moving-average step, leaf by leaf: ``decay * tree + (1 - decay) * new``.

    .. math::

        v \leftarrow d\,v + (1 - d)\,w

    computed in float32 (or wider) and returned in the dtypes of ``tree``. Use
    it for what is not a parameter, such as Flax BatchNorm ``batch_stats``,
    next to :func:`ema_params` (which averages the params).

    Args:
      tree: the average ``v`` (floating leaves).
      new: the new values ``w``, with the structure and shapes of ``tree``.
      decay: ``d`` in ``[0, 1]``.

    Returns:
      The updated average, with the structure and dtypes of ``tree``.

    Examples:
      >>> import jax.numpy as jnp, sam_optax
      >>> sam_optax.ema_update({"mean": jnp.zeros(2)}, {"mean": jnp.ones(2)}, 0.75)
      {'mean': Array([0.25, 0.25], dtype=float32)}

    References:
      Du et al., Sharpness-Aware Training for Free, NeurIPS 2022,
      https://arxiv.org/abs/2205.14083
    """
    _validate.in_range("decay", decay, 0.0, 1.0)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise ValueError(
                f"sam_optax.ema_update: `tree` leaf {jax.tree_util.keystr(path)} has dtype "
                f"{jnp.result_type(leaf)}; an average needs floating leaves only."
            )
    if jax.tree.structure(tree) != jax.tree.structure(new):
        raise ValueError(
            "sam_optax.ema_update: `new` must have the structure of `tree`, got "
            f"{jax.tree.structure(new)} and {jax.tree.structure(tree)}."
        )

    def step(v, w):
        v = jnp.asarray(v)
        acc = _tree.accum_dtype(v.dtype)
        d = jnp.asarray(decay, acc)
        return (d * v.astype(acc) + (1 - d) * jnp.asarray(w).astype(acc)).astype(v.dtype)

    return jax.tree.map(step, tree, new)


class EMAState(NamedTuple):
    """State of :func:`ema_params`.

    Attributes:
      count: updates seen so far (int32).
      ema: the exponential moving average of the params, with their structure
        and shapes (dtype: the params', or ``accumulator_dtype``).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    ema: PyTree


def ema_params(
    decay: float | jax.Array = 0.9998, *, accumulator_dtype: Any | None = None
) -> optax.GradientTransformationExtraArgs:
    r"""An exponential moving average of the params, placed last in a chain.

    The updates pass through unchanged. The average starts at the initial
    params and folds in the parameter value after every update,
    ``w_new = params + updates``, without bias correction (as timm's
    ``ModelEmaV2``, which MESA's official code uses):

    .. math::

        v_0 = w_0, \qquad v \leftarrow d\,v + (1 - d)\,w_{\mathrm{new}}

    Read it with :func:`ema_params_of`. It sees the final updates, so it must be
    the last member of ``optax.chain`` (after the base optimizer); average the
    model's other collections (BatchNorm ``batch_stats``) with
    :func:`ema_update`. With ``T`` steps, :math:`v_T` still holds
    :math:`d^{T}` of :math:`w_0`: choose ``d`` for the length of training
    (``1 / (1 - d)`` steps is the averaging horizon).

    Args:
      decay: ``d`` in ``[0, 1]`` (timm and MESA: 0.9998).
      accumulator_dtype: dtype of the stored average; ``None`` keeps the
        params'. The fold is computed in float32 (or wider) in any case.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``params`` and accepts (and ignores) every other extra argument.

    Examples:
      >>> import jax.numpy as jnp, optax, sam_optax
      >>> params = jnp.array([0.0])
      >>> tx = optax.chain(optax.sgd(1.0), sam_optax.ema_params(decay=0.5))
      >>> state = tx.init(params)
      >>> for _ in range(2):  # w: -1, -2; v: 0.5 * 0 + 0.5 * -1, 0.5 * -0.5 + 0.5 * -2
      ...     updates, state = tx.update(jnp.ones(1), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> sam_optax.ema_params_of(state)
      Array([-1.25], dtype=float32)

    References:
      Du et al., Sharpness-Aware Training for Free, NeurIPS 2022,
      https://arxiv.org/abs/2205.14083
    """
    _validate.in_range("decay", decay, 0.0, 1.0)
    _validate.dtype("accumulator_dtype", accumulator_dtype)

    def init_fn(params):
        _validate.floating_params("ema_params", params)

        def copy(p):
            p = jnp.asarray(p)
            return jnp.array(p, dtype=p.dtype if accumulator_dtype is None else accumulator_dtype)

        return EMAState(count=jnp.zeros([], jnp.int32), ema=jax.tree.map(copy, params))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "sam_optax.ema_params: `update` needs `params`: the average is taken over "
                "the parameters after the update, `params + updates`."
            )
        check_state(state, jax.eval_shape(init_fn, params), "ema_params")
        new_params = optax.apply_updates(params, updates)
        new_state = EMAState(
            count=optax.safe_increment(state.count),
            ema=ema_update(state.ema, new_params, decay),
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ema_params_of(opt_state: PyTree) -> PyTree:
    r"""The parameter EMA :math:`v` held anywhere inside a (nested) optimizer state.

    Args:
      opt_state: the state of an optimizer that contains :func:`ema_params`
        once (for example :func:`mesa`'s), at any depth.

    Returns:
      The average, with the structure and shapes of the params.

    Raises:
      ValueError: if ``opt_state`` holds no EMA state, or more than one.

    Examples:
      >>> import jax.numpy as jnp, optax, sam_optax
      >>> state = sam_optax.mesa(optax.sgd(0.1)).init({"w": jnp.ones(2)})
      >>> sam_optax.ema_params_of(state)
      {'w': Array([1., 1.], dtype=float32)}

    References:
      Du et al., Sharpness-Aware Training for Free, NeurIPS 2022,
      https://arxiv.org/abs/2205.14083
    """
    return find_state(opt_state, EMAState, "ema_params_of").ema


class MesaState(NamedTuple):
    """State of MESA's loss weight (inside :func:`mesa`'s chain).

    Attributes:
      count: updates taken so far (int32): the index of the coming step.
      weight: the coming step's weight of the trajectory loss, ``lambda`` inside
        the window ``[start_step, end_step)`` and 0 outside (float32).
      temperature: the trajectory loss's ``tau`` (float32).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    weight: jax.Array
    temperature: jax.Array


def _loss_weight(
    weight: float | jax.Array,
    temperature: float | jax.Array,
    start_step: int | jax.Array,
    end_step: int | jax.Array | None,
) -> optax.GradientTransformationExtraArgs:
    """A pass-through transformation that holds the weight of the coming step's KL term."""

    def weight_at(t):
        active = t >= start_step
        if end_step is not None:
            active = jnp.logical_and(active, t < end_step)
        return jnp.where(active, jnp.asarray(weight, jnp.float32), 0.0)

    def init_fn(params):
        del params
        count = jnp.zeros([], jnp.int32)
        return MesaState(count, weight_at(count), jnp.asarray(temperature, jnp.float32))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        count = optax.safe_increment(state.count)
        return updates, MesaState(count, weight_at(count), state.temperature)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mesa(
    base_optimizer: optax.GradientTransformation,
    weight: float | jax.Array = 0.8,
    temperature: float | jax.Array = 5.0,
    decay: float | jax.Array = 0.9998,
    start_step: int | jax.Array = 0,
    end_step: int | jax.Array | None = None,
    *,
    accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""MESA: sharpness-aware training at the cost of one forward pass of an EMA teacher.

    MESA adds to the training loss a trajectory loss towards the model's own
    exponential moving average :math:`v` (the teacher, evaluated in eval mode,
    without gradient):

    .. math::

        L(w) = L_{\mathrm{task}}(w) + \lambda_t\,\mathrm{KL}_\tau\big(f_v(x), f_w(x)\big),
        \qquad \lambda_t = \lambda\,[t_{\mathrm{start}} \le t < t_{\mathrm{end}}],
        \qquad v \leftarrow d\,v + (1 - d)\,w_{\mathrm{new}}

    (:func:`trajectory_kl`). The optimizer side is ``optax.chain(base_optimizer,
    ema_params(decay), <loss weight>)``: the updates are the base optimizer's,
    untouched; the state holds :math:`v` (:func:`ema_params_of`) and the coming
    step's :math:`\lambda_t` and :math:`\tau`, which :func:`mesa_loss` reads.
    The loss side is the caller's: one forward pass of the teacher at
    :math:`v` and :func:`mesa_loss` added to the loss whose gradient the step
    takes, so a step costs one forward-backward pass and one forward pass.
    Models with BatchNorm also average their ``batch_stats`` with
    :func:`ema_update` after every step (timm's ``ModelEmaV2`` averages the
    whole state dict). ``weight = 0`` gives the base optimizer.

    The official code counts the window in epochs with a strict test
    (``epoch > kl_start``, epochs from 0); here ``start_step`` is the first
    step (from 0) whose loss has the term, so the official window is
    ``start_step = (kl_start + 1) * steps_per_epoch``. The paper trains ImageNet
    for about 112,000 steps, where ``decay = 0.9998`` averages over the last
    5,000 steps (4 epochs); for a short run choose ``1 / (1 - decay)`` as a
    similar fraction of training. The registry's entry keeps this default for
    ``weight`` and ``temperature`` but uses ``decay = 0.98`` over its 1,000
    steps of MNIST-1D: at 0.9998 the teacher stays near the initial weights and
    the test accuracy falls to 89.8 % (SGD: 93.3 %); at 0.98, 93.3 % clean and
    65.6 % with 40 % noisy labels (SGD: 60.5 %), 3 seeds each (see
    ``docs/methods/efficient.md``).

    Args:
      base_optimizer: the optimizer (e.g. ``optax.sgd``), or a sharpness-aware
        chain: the KL term is part of the loss that any ``grad_fn`` differentiates.
      weight: ``lambda >= 0`` (official README: 0.8; argparse default 0.3).
      temperature: ``tau > 0`` (official: 5).
      decay: the EMA's ``d`` in ``[0, 1]`` (official: 0.9998).
      start_step: the first step (from 0) whose loss has the KL term (>= 0).
      end_step: the first step without it again; ``None``: until the end.
      accumulator_dtype: dtype of the stored EMA (see :func:`ema_params`).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
      ``params`` and passes every extra argument to ``base_optimizer``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> x, y = jnp.ones((4, 3)), jnp.array([0, 1, 0, 1])
      >>> apply = lambda w, x: x @ w
      >>> def loss(w, opt_state):
      ...     logits = apply(w, x)
      ...     teacher = apply(sam_optax.ema_params_of(opt_state), x)
      ...     ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      ...     return ce + sam_optax.mesa_loss(opt_state, logits, teacher)
      >>> tx = sam_optax.mesa(optax.sgd(0.1), decay=0.9)
      >>> w = jnp.zeros((3, 2))
      >>> opt_state = tx.init(w)
      >>> for _ in range(3):
      ...     grads = jax.grad(loss)(w, opt_state)
      ...     updates, opt_state = tx.update(grads, opt_state, w)
      ...     w = optax.apply_updates(w, updates)
      >>> sam_optax.ema_params_of(opt_state).shape
      (3, 2)

    Note:
      MESA itself needs no ``grad_fn``; a sharpness-aware ``base_optimizer``
      receives it, and its ``grad_fn`` must differentiate the same loss as
      ``updates``, KL term included (same batch, same teacher logits).

    References:
      Du et al., Sharpness-Aware Training for Free, NeurIPS 2022,
      https://arxiv.org/abs/2205.14083
    """
    _validate.transformation("base_optimizer", base_optimizer)
    _validate.non_negative("weight", weight)
    _validate.positive("temperature", temperature)
    _validate.integer("start_step", start_step, 0)
    if end_step is not None:
        _validate.integer("end_step", end_step, 0)
    return optax.chain(
        base_optimizer,
        ema_params(decay, accumulator_dtype=accumulator_dtype),
        _loss_weight(weight, temperature, start_step, end_step),
    )


def mesa_loss(opt_state: PyTree, student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    r"""MESA's loss term for the coming step: :math:`\lambda_t\,\mathrm{KL}_\tau(t, z)`.

    Reads :math:`\lambda_t` (0 outside the window) and :math:`\tau` from the
    state of :func:`mesa` and returns ``weight * trajectory_kl(student_logits,
    teacher_logits, temperature)``. Add it to the loss that the training step
    differentiates, so that its gradient comes from the same backward pass.

    Args:
      opt_state: the state of an optimizer that contains :func:`mesa` once.
      student_logits: ``[..., C]`` logits of the trained model (train mode).
      teacher_logits: the logits of the EMA model :func:`ema_params_of` on the
        same inputs (eval mode); the gradient does not flow into them.

    Returns:
      A float32 scalar.

    Examples:
      >>> import jax.numpy as jnp, optax, sam_optax
      >>> state = sam_optax.mesa(optax.sgd(0.1), weight=0.5, start_step=1).init(jnp.zeros(1))
      >>> z, t = jnp.zeros((1, 2)), jnp.array([[1.0, 0.0]])
      >>> float(sam_optax.mesa_loss(state, z, t))  # step 0 is before the window
      0.0

    References:
      Du et al., Sharpness-Aware Training for Free, NeurIPS 2022,
      https://arxiv.org/abs/2205.14083
    """
    state = find_state(opt_state, MesaState, "mesa_loss")
    return state.weight * trajectory_kl(student_logits, teacher_logits, state.temperature)
