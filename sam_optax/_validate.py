"""Construction-time validation of hyperparameters, with errors that name them."""

from __future__ import annotations

import numbers
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax import _tree


def _describe(value: Any) -> str:
    return repr(value)


def number_or_schedule(name: str, value: Any) -> None:
    """Rejects a value that is neither a number, a scalar array nor a callable schedule."""
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be a number or an optax schedule, got {value!r}.")
    if callable(value) or _tree.is_python_number(value):
        return
    if hasattr(value, "dtype"):
        if getattr(value, "ndim", 0) == 0:
            return
        raise ValueError(f"`{name}` must be a scalar, got an array of shape {value.shape}.")
    raise ValueError(
        f"`{name}` must be a number or an optax schedule, got {_describe(value)} "
        f"of type {type(value).__name__}."
    )


def in_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Checks a Python-number hyperparameter against an interval; arrays pass.

    Traced or array values (``optax.inject_hyperparams``) and schedules cannot be
    checked at construction and are accepted as they are.
    """
    number_or_schedule(name, value)
    if not _tree.is_python_number(value) or isinstance(value, bool):
        return
    ok = True
    if low is not None:
        ok &= value > low if low_open else value >= low
    if high is not None:
        ok &= value < high if high_open else value <= high
    ok &= value == value  # NaN
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        interval = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        raise ValueError(f"`{name}` must lie in {interval}, got {value!r}.")


def non_negative(name: str, value: Any) -> None:
    """Checks ``value >= 0`` for a Python number."""
    in_range(name, value, 0.0)


def positive(name: str, value: Any) -> None:
    """Checks ``value > 0`` for a Python number."""
    in_range(name, value, 0.0, low_open=True)


def axis_name(value: Any) -> None:
    """Checks that ``axis_name`` is ``None`` or a hashable axis name."""
    if value is not None and not isinstance(value, str | tuple):
        raise ValueError(f"`axis_name` must be None, a string or a tuple of names, got {value!r}.")


def mask(value: Any, name: str = "mask") -> None:
    """Checks that a mask is ``None``, a callable or a pytree (structure checked at init)."""
    if isinstance(value, bool | str | int | float):
        raise ValueError(
            f"`{name}` must be None, a pytree of booleans with the structure of the params, "
            f"or a function of the params returning one; got {value!r}."
        )


def piece(name: str, value: Any, kind: type) -> None:
    """Checks that a piece argument is an instance of ``kind`` (a called constructor)."""
    if not isinstance(value, kind):
        hint = " (was the constructor passed without calling it?)" if callable(value) else ""
        raise ValueError(
            f"`{name}` must be a sam_optax.{kind.__name__}{hint}, got {value!r} "
            f"of type {type(value).__name__}."
        )


def not_static(name: str, value: Any, kind: str) -> None:
    """Refuses an array where a Python number is needed, saying to use ``static_args``.

    ``optax.inject_hyperparams`` turns every numeric argument, defaults included,
    into an array; a structural one (a period, a subset size) must stay a number.
    """
    if isinstance(value, jax.Array | np.ndarray):
        raise ValueError(
            f"`{name}` must be a Python number ({kind}), got the array {value!r}: it fixes "
            "the structure of the computation, so it cannot be an array. Under "
            f"optax.inject_hyperparams pass it in `static_args`: "
            f"optax.inject_hyperparams(method, static_args=({name!r},))(...) (it turns every "
            "numeric argument into an array, defaults included)."
        )


def integer(name: str, value: Any, low: int | None, *, static: bool = False) -> Any:
    """Checks that ``value`` is an integer ``>= low`` (any integer when ``low`` is None).

    With ``static=True`` the value shapes arrays or seeds a key (a group size, a
    period, a seed) and must be a Python integer, which is returned; otherwise an
    array (``inject_hyperparams``) passes unchecked.
    """
    if static:
        not_static(name, value, "an integer")
        bad_type = isinstance(value, bool) or not isinstance(value, numbers.Integral)
        if bad_type or (low is not None and value < low):
            wanted = {None: "an integer", 1: "a positive integer"}.get(low, f"an integer >= {low}")
            raise ValueError(f"`{name}` must be {wanted}, got {value!r}.")
        return operator.index(value)
    in_range(name, value, low)
    if _tree.is_python_number(value) and (isinstance(value, bool) or int(value) != value):
        raise ValueError(f"`{name}` must be an integer, got {value!r}.")
    return value


def function(name: str, value: Any) -> None:
    """Checks that ``value`` is callable."""
    if not callable(value):
        raise ValueError(
            f"`{name}` must be a function, got {value!r} of type {type(value).__name__}."
        )


def transformation(name: str, value: Any) -> None:
    """Checks that ``value`` is an optax transformation (has ``init`` and ``update``)."""
    if not (callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))):
        raise ValueError(
            f"`{name}` must be an optax GradientTransformation (with init and update), "
            f"got {value!r} of type {type(value).__name__}."
        )


def dtype(name: str, value: Any) -> None:
    """Checks that ``value`` is ``None`` or names a floating dtype."""
    if value is None:
        return
    try:
        ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"`{name}` must be None or a floating dtype, got {value!r}.")


def key(name: str, value: Any) -> None:
    """Checks that ``value`` is a JAX PRNG key (typed, or raw ``uint32[2]``)."""
    dtype = getattr(value, "dtype", None)
    if dtype is None or not (
        jnp.issubdtype(dtype, jax.dtypes.prng_key)
        or (dtype == jnp.uint32 and value.shape[-1:] == (2,))
    ):
        raise ValueError(f"`{name}` must be a JAX PRNG key (jax.random.key(seed)), got {value!r}.")


def floating_params(name: str, params: Any) -> None:
    """Refuses params with an integer (or boolean) leaf, naming the leaf and what to do.

    For the methods whose state or update covers every leaf (MSAM's momentum,
    SWA's average); the sharpness-aware skeleton passes such leaves through instead.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise ValueError(
                f"sam_optax.{name}: the params leaf {jax.tree_util.keystr(path)} has dtype "
                f"{dtype}; {name} needs floating (or complex) leaves only. Keep integer "
                "leaves (step counters, indices) out of the params, or out of this "
                "transformation with optax.partition / optax.masked and "
                "optax.set_to_zero() for them."
            )


def one_of(name: str, value: Any, options: tuple[str, ...]) -> None:
    """Checks that ``value`` is one of the strings ``options``."""
    if not (isinstance(value, str) and value in options):
        raise ValueError(
            f"`{name}` must be one of {', '.join(repr(o) for o in options)}, got {value!r}."
        )
