"""Method specifications: a registry name with hyperparameter overrides, parsed from text.

``sam:rho=0.1`` is SAM with ``rho = 0.1``; ``looksam:alpha=0.3:k=10`` overrides two
hyperparameters; a sweep ``looksam:alpha=0,0.3,0.7`` expands to one specification per
value (the product over keys when several keys list several values). Values are parsed,
never evaluated: ``true``/``false``, integers, decimal numbers, and, for a
hyperparameter that takes an optax schedule, one of the schedules of
:data:`SCHEDULES` written as a call, e.g. ``rho=linear(0,0.1,500)``.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import optax

from sam_optax import registry

BASELINE = "sgd"

# Arguments that the registry supplies from the run itself, never from a specification.
_SUPPLIED = ("base_optimizer", "learning_rate", "total_steps")

SCHEDULES: dict[str, tuple[Callable[..., optax.Schedule], tuple[str, ...], int]] = {
    # name: (optax constructor, its argument names in order, how many are required)
    "constant": (optax.constant_schedule, ("value",), 1),
    "linear": (optax.linear_schedule, ("init_value", "end_value", "transition_steps"), 3),
    "cosine": (optax.cosine_decay_schedule, ("init_value", "decay_steps", "alpha"), 2),
    "warmup_cosine": (
        optax.warmup_cosine_decay_schedule,
        ("init_value", "peak_value", "warmup_steps", "decay_steps", "end_value"),
        4,
    ),
}

_INT = re.compile(r"[+-]?\d+")
_CALL = re.compile(r"([a-z_]+)\((.*)\)")


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One hyperparameter of a registry method that a specification may set.

    Attributes:
      name: the keyword.
      default: the registry's default (the value used when it is not overridden).
      kind: ``"int"``, ``"float"`` or ``"bool"``.
      schedule: whether an optax schedule is accepted.
      paper: the constructor's own default (the paper's value); for a
        hyperparameter the constructor does not take, the registry entry's
        ``paper_values`` or else its default.
    """

    name: str
    default: Any
    kind: str
    schedule: bool
    paper: Any

    def describe(self) -> str:
        """``name=default (kind)``, for error messages."""
        kind = f"{self.kind} or schedule" if self.schedule else self.kind
        return f"{self.name}={_format(self.default)} ({kind})"


def _kind(value: Any, annotation: Any) -> str:
    if isinstance(value, bool) or "bool" == str(annotation):
        return "bool"
    if isinstance(value, int) and "float" not in str(annotation):
        return "int"
    return "float"


def parameters(name: str) -> dict[str, Parameter]:
    """The hyperparameters a specification of registry method ``name`` may set.

    They are the constructor's keyword arguments that take a number or a boolean
    (arguments the run supplies, such as the learning rate, excluded), and the
    registry's own hyperparameters (SAM-every-k's ``k``, SWA's ``start_fraction``),
    each with the registry's default.

    Args:
      name: a key of :data:`sam_optax.registry.METHODS`.

    Returns:
      ``keyword -> Parameter``, in the constructor's order.

    Examples:
      >>> from sam_optax.compare.specs import parameters
      >>> [p.describe() for p in parameters("looksam").values()][:3]
      ['rho=0.1 (float or schedule)', 'k=5 (int)', 'alpha=0.1 (float)']
    """
    method = registry.METHODS[name]
    found: dict[str, Parameter] = {}
    if method.constructor is not None:
        for p in inspect.signature(method.constructor).parameters.values():
            default = method.defaults.get(p.name, p.default)
            if p.name in _SUPPLIED or default is inspect.Parameter.empty:
                continue
            if not isinstance(default, int | float):  # masks, policies, axis names
                continue
            annotation = str(p.annotation)
            found[p.name] = Parameter(
                p.name, default, _kind(default, annotation), "Schedule" in annotation, p.default
            )
    for key, default in method.defaults.items():
        if key not in found:
            paper = method.paper_values.get(key, default)
            found[key] = Parameter(key, default, _kind(default, ""), False, paper)
    return found


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def split_top_level(text: str, sep: str) -> list[str]:
    """Splits ``text`` on ``sep`` outside parentheses.

    Examples:
      >>> from sam_optax.compare.specs import split_top_level
      >>> split_top_level("sam:rho=linear(0,0.1,50),asam", ",")
      ['sam:rho=linear(0,0.1,50)', 'asam']
    """
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced parentheses in {text!r}")
        if char == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise ValueError(f"unbalanced parentheses in {text!r}")
    parts.append("".join(current))
    return [p.strip() for p in parts]


def _number(text: str) -> int | float:
    if _INT.fullmatch(text):
        return int(text)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _schedule(text: str) -> optax.Schedule:
    match = _CALL.fullmatch(text)
    if match is None or match.group(1) not in SCHEDULES:
        raise ValueError(
            f"{text!r} is not a value; a schedule is one of "
            + ", ".join(f"{n}({', '.join(SCHEDULES[n][1])})" for n in SCHEDULES)
        )
    name, body = match.groups()
    constructor, names, required = SCHEDULES[name]
    args = [_number(a) for a in split_top_level(body, ",")] if body.strip() else []
    if not required <= len(args) <= len(names):
        raise ValueError(
            f"schedule {name} takes {required} to {len(names)} numbers "
            f"({', '.join(names)}), got {len(args)}"
        )
    return constructor(**dict(zip(names, args, strict=False)))


def parse_value(text: str, parameter: Parameter) -> Any:
    """Parses one hyperparameter value for ``parameter`` (never evaluated as code).

    Args:
      text: the value as written.
      parameter: what it sets (see :func:`parameters`).

    Returns:
      A bool, int, float or optax schedule.

    Examples:
      >>> from sam_optax.compare.specs import parameters, parse_value
      >>> p = parameters("sam")["rho"]
      >>> parse_value("0.1", p), round(float(parse_value("linear(0,0.1,10)", p)(5)), 6)
      (0.1, 0.05)
    """
    text = text.strip()
    if parameter.kind == "bool":
        if text.lower() not in ("true", "false"):
            raise ValueError(f"`{parameter.name}` takes true or false, got {text!r}")
        return text.lower() == "true"
    if "(" in text:
        if not parameter.schedule:
            raise ValueError(f"`{parameter.name}` takes a number, not a schedule, got {text!r}")
        return _schedule(text)
    value = _number(text)
    if parameter.kind == "int" and not isinstance(value, int):
        raise ValueError(f"`{parameter.name}` takes an integer, got {text!r}")
    return value


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A registry method with hyperparameter overrides.

    Attributes:
      name: the registry name.
      overrides: ``(keyword, value)`` pairs, parsed.
      texts: the values as written, for the label.
    """

    name: str
    overrides: tuple[tuple[str, Any], ...] = ()
    texts: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """``name:key=value:...``, the row's label."""
        pairs = zip(self.overrides, self.texts, strict=True)
        return ":".join([self.name, *(f"{k}={t}" for (k, _), t in pairs)])

    @property
    def kwargs(self) -> dict[str, Any]:
        """The overrides as keyword arguments of ``registry.make_optimizer``."""
        return dict(self.overrides)

    def build(
        self,
        base: optax.GradientTransformation,
        *,
        learning_rate: optax.ScalarOrSchedule,
        total_steps: int,
        batch_like: Any = None,
        num_data: int | None = None,
    ) -> optax.GradientTransformation:
        """The full optimizer, via :func:`sam_optax.registry.make_optimizer`."""
        return registry.make_optimizer(
            self.name,
            base,
            learning_rate=learning_rate,
            total_steps=total_steps,
            batch_like=batch_like,
            num_data=num_data,
            **self.kwargs,
        )


def _unknown_method(name: str) -> ValueError:
    return ValueError(f"unknown method {name!r}; choose from: {', '.join(registry.METHODS)}")


def _listing(name: str) -> str:
    params = parameters(name)
    if not params:
        return f"{name} takes no hyperparameters"
    return f"{name} takes: " + ", ".join(p.describe() for p in params.values())


def _check(spec: MethodSpec) -> MethodSpec:
    """Builds the optimizer once, so that a value the constructor rejects fails now."""
    try:
        # Any run length and data size: the build only validates the hyperparameters.
        spec.build(optax.sgd(0.1), learning_rate=0.1, total_steps=100, num_data=1000)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{spec.label}: {err} ({_listing(spec.name)})") from None
    return spec


def _pairs(text: str, *, many: bool) -> tuple[str, list[tuple[Parameter, list[str]]]]:
    name, *assignments = split_top_level(text, ":")
    if name not in registry.METHODS:
        raise _unknown_method(name)
    params = parameters(name)
    pairs: list[tuple[Parameter, list[str]]] = []
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise ValueError(f"{text!r}: expected key=value after {name!r}, got {assignment!r}")
        if key not in params:
            raise ValueError(f"{text!r}: unknown hyperparameter {key!r}; {_listing(name)}")
        if key in [p.name for p, _ in pairs]:
            raise ValueError(f"{text!r}: {key!r} is given twice")
        values = split_top_level(value, ",") if many else [value.strip()]
        if any(not v for v in values):
            raise ValueError(f"{text!r}: empty value for {key!r}")
        pairs.append((params[key], values))
    return name, pairs


def _spec(name: str, chosen: Iterable[tuple[Parameter, str]], source: str) -> MethodSpec:
    overrides, texts = [], []
    for parameter, text in chosen:
        try:
            value = parse_value(text, parameter)
        except ValueError as err:
            raise ValueError(f"{source!r}: {err}; {_listing(name)}") from None
        overrides.append((parameter.name, value))
        texts.append(text)
    return _check(MethodSpec(name, tuple(overrides), tuple(texts)))


def parse_method(text: str) -> MethodSpec:
    """Parses ``name:key=value:...`` into a :class:`MethodSpec`, checking every value.

    Args:
      text: a registry name, optionally followed by ``:key=value`` pairs.

    Returns:
      The specification. An unknown method or key, a malformed value, or a value
      the constructor rejects raises a ``ValueError`` that lists the method's
      hyperparameters.

    Examples:
      >>> from sam_optax.compare.specs import parse_method
      >>> spec = parse_method("looksam:alpha=0.3:k=10")
      >>> spec.label, spec.kwargs
      ('looksam:alpha=0.3:k=10', {'alpha': 0.3, 'k': 10})
    """
    if not isinstance(text, str):
        raise ValueError(f"a method must be given as a string, got {text!r}")
    name, pairs = _pairs(text.strip(), many=False)
    return _spec(name, [(p, values[0]) for p, values in pairs], text)


def expand_sweep(text: str) -> list[MethodSpec]:
    """Expands ``name:key=v1,v2,...[:key2=...]`` into one spec per point of the grid.

    Args:
      text: a registry name and one or more ``key=`` lists of comma-separated values.

    Returns:
      The specifications, in the grid's order (the last key varies fastest).

    Examples:
      >>> from sam_optax.compare.specs import expand_sweep
      >>> [s.label for s in expand_sweep("looksam:alpha=0,0.7:k=5,10")]
      ['looksam:alpha=0:k=5', 'looksam:alpha=0:k=10',
       'looksam:alpha=0.7:k=5', 'looksam:alpha=0.7:k=10']
    """
    if not isinstance(text, str):
        raise ValueError(f"a sweep must be given as a string, got {text!r}")
    name, pairs = _pairs(text.strip(), many=True)
    if not pairs:
        raise ValueError(f"sweep {text!r} sets no hyperparameter; write e.g. {name}:rho=0.01,0.1")
    grid = itertools.product(*[[(p, v) for v in values] for p, values in pairs])
    return [_spec(name, point, text) for point in grid]


def _as_list(items: str | Sequence[Any] | None) -> list[Any]:
    if items is None:
        return []
    if isinstance(items, str):
        return [s for s in split_top_level(items, ",") if s]
    return list(items)


def resolve_methods(
    methods: str | Sequence[str | MethodSpec] | None,
    sweep: str | Sequence[str] | None = None,
) -> list[MethodSpec]:
    """The methods of a comparison: parsed, ``sgd`` first, without repeats.

    ``methods=None`` means every registered method at its defaults, unless a sweep
    is given (then only the sweep, and ``sgd``). The baseline ``sgd`` is always run
    first, since costs are relative to it. The same method may appear several
    times with different overrides; identical labels run once.

    Args:
      methods: specifications (``"sgd,sam:rho=0.1,looksam:alpha=0.3:k=10"``, or a
        list of strings or :class:`MethodSpec`), or ``None``.
      sweep: one or more sweeps (see :func:`expand_sweep`); a single string holds one.

    Returns:
      The specifications to run.

    Examples:
      >>> from sam_optax.compare import resolve_methods
      >>> [s.label for s in resolve_methods("sam,sam:rho=0.1,asam")]
      ['sgd', 'sam', 'sam:rho=0.1', 'asam']
      >>> [s.label for s in resolve_methods(None, sweep="sam:rho=0.02,0.1")]
      ['sgd', 'sam:rho=0.02', 'sam:rho=0.1']
    """
    sweeps = [sweep] if isinstance(sweep, str) else list(sweep or [])
    if methods is None and not sweeps:
        specs = [MethodSpec(name) for name in registry.METHODS]
    else:
        specs = [m if isinstance(m, MethodSpec) else parse_method(m) for m in _as_list(methods)]
        if methods is not None and not specs:
            raise ValueError(f"no method given; choose from: {', '.join(registry.METHODS)}")
    for text in sweeps:
        specs += expand_sweep(text)
    unique = {spec.label: spec for spec in [MethodSpec(BASELINE), *specs]}
    return list(unique.values())
