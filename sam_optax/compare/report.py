"""What ``sam-optax compare`` reports: the Markdown table, ``results.json`` and figures."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

import sam_optax
from sam_optax.compare.specs import BASELINE, parameters

# Row fields measured by training; any of them non-finite marks the row as diverged.
_NUMBERS = ("test_acc_mean", "train_loss", "sharpness")


def environment() -> dict[str, Any]:
    """The device, the versions and the date, for the record of a run."""
    import flax

    device = jax.devices()[0]
    kind = device.device_kind
    return {
        "device": device.platform
        if kind.lower() == device.platform
        else f"{device.platform} ({kind})",
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "optax": optax.__version__,
            "flax": flax.__version__,
            "sam_optax": sam_optax.__version__,
        },
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if _finite(value) else "–"


def _json_ready(value: Any) -> Any:
    """Non-finite floats become ``None`` (strict JSON has no NaN or infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def prepare_out(out: str | os.PathLike) -> str:
    """Creates the output directory and checks that it is writable, before any training.

    Args:
      out: the directory for ``results.json`` and the figures.

    Returns:
      The directory, as a string.

    Raises:
      ValueError: naming ``out`` and what is wrong (a file is in the way, a parent
        is not a directory, no permission).

    Examples:
      >>> import os, tempfile
      >>> from sam_optax.compare import prepare_out
      >>> d = tempfile.mkdtemp()
      >>> prepare_out(os.path.join(d, "new")) == os.path.join(d, "new")
      True
    """
    out = os.fspath(out)
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except FileExistsError:
        raise ValueError(f"--out {out!r} is a file, not a directory") from None
    except OSError as err:
        raise ValueError(f"--out {out!r} cannot be used: {err.strerror}") from None
    return out


@dataclasses.dataclass
class CompareResult:
    """The outcome of :func:`sam_optax.compare.run_compare`.

    Attributes:
      rows: one dict per method specification, in run order, with ``method``
        (the label, e.g. ``looksam:alpha=0.3``), ``name`` (the registry name),
        ``overrides`` (``key -> value as written``), ``paper``,
        ``test_acc_mean`` and ``test_acc_std`` (fractions; std over seeds with
        ``ddof=1``, 0 for one seed), ``test_acc`` (per seed), ``train_loss``,
        ``sharpness`` (top Hessian eigenvalue), ``grads_per_step`` (measured),
        ``expected_grads_per_step`` (the registry's), ``probe_fraction``,
        ``time_per_step`` (seconds) and ``rel_cost`` (time over ``sgd``'s,
        paired; both NaN when the run was not timed), ``compile_s``,
        ``curves`` (per seed, the test accuracy at ``curve_steps``) and
        ``finite`` (whether accuracy, training loss and sharpness are finite).
      curve_steps: the steps at which the curves were measured.
      config: the run's settings.
      environment: device, versions and date.

    Examples:
      >>> from sam_optax.compare import CompareResult
      >>> row = dict(method="sgd", test_acc_mean=0.9, test_acc_std=0.01, train_loss=0.1,
      ...            sharpness=2.0, grads_per_step=1.0, probe_fraction=0.0,
      ...            time_per_step=0.002, rel_cost=1.0, curves=[[0.9]])
      >>> print(CompareResult([row], [10], {}, {}).to_markdown().splitlines()[-1])
      | sgd | 90.00 ± 1.00 | 0.1000 | 2.00 | 1.00 | 0.00 | 2.00 | 1.00 |
    """

    rows: list[dict[str, Any]]
    curve_steps: list[int]
    config: dict[str, Any]
    environment: dict[str, Any]

    def __post_init__(self) -> None:
        for row in self.rows:
            row.setdefault("finite", all(_finite(row.get(k, 0.0)) for k in _NUMBERS))

    def to_markdown(self) -> str:
        """The results as a Markdown table, one line per method.

        A run whose training loss or sharpness is not finite reads ``diverged``.
        """
        lines = [
            "| method | test acc. (%) | train loss | λ_max | grads / step | probe frac. "
            "| ms / step | rel. cost |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            loss = _fmt(r["train_loss"], ".4f") if _finite(r["train_loss"]) else "diverged"
            lines.append(
                f"| {r['method']} | {100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f} "
                f"| {loss} | {_fmt(r['sharpness'], '.2f')} "
                f"| {r['grads_per_step']:.2f} | {r['probe_fraction']:.2f} "
                f"| {_fmt(1e3 * r['time_per_step'], '.2f')} | {_fmt(r['rel_cost'], '.2f')} |"
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Everything, as a strict-JSON-ready dict (non-finite numbers are ``null``)."""
        return _json_ready(
            {
                "config": self.config,
                "environment": self.environment,
                "curve_steps": self.curve_steps,
                "rows": self.rows,
            }
        )

    def figure(self) -> Any:
        """A matplotlib figure: accuracy against relative cost, and accuracy curves.

        Without timing (``rel_cost`` NaN) the left panel is accuracy per method.
        """
        from matplotlib.figure import Figure

        fig = Figure(figsize=(13, 5.5), layout="constrained")
        ax_cost, ax_curve = fig.subplots(1, 2)
        timed = any(_finite(r["rel_cost"]) for r in self.rows)
        for i, r in enumerate(self.rows):
            color = f"C{i % 10}"
            x = r["rel_cost"] if timed else i
            ax_cost.errorbar(
                x,
                100 * r["test_acc_mean"],
                yerr=100 * r["test_acc_std"],
                fmt="o",
                color=color,
                capsize=3,
            )
            ax_cost.annotate(
                r["method"],
                (x, 100 * r["test_acc_mean"]),
                fontsize=8,
                xytext=(4, 4 if i % 2 else -10),
                textcoords="offset points",
            )
            curves = 100 * np.asarray(r["curves"], dtype=float)
            ax_curve.plot(
                self.curve_steps,
                curves.mean(0),
                color=color,
                label=r["method"],
                linestyle=("-", "--", ":")[(i // 10) % 3],
            )
        ax_cost.set_xlabel(
            f"cost relative to {BASELINE} (wall time per step)" if timed else "method (untimed)"
        )
        ax_cost.set_ylabel("test accuracy (%), mean ± std over seeds")
        ax_curve.set_xlabel("step")
        ax_curve.set_ylabel("test accuracy (%), mean over seeds")
        ax_curve.legend(fontsize=7, ncol=2)
        fig.suptitle(self.title())
        return fig

    def title(self) -> str:
        """``dataset, label noise, base, seeds, steps``: one line for figures."""
        c = self.config
        return (
            f"{c['dataset']}, label noise {c['label_noise']:g}, base {c.get('base', 'sgd')}, "
            f"{c['seeds']} seed(s), {c['steps']} steps"
        )

    def sweeps(self) -> list[tuple[str, str]]:
        """The ``(method name, key)`` pairs whose rows vary one overridden key."""
        found: dict[tuple[str, str], int] = {}
        for r in self.rows:
            overrides = r.get("overrides") or {}
            if len(overrides) == 1:
                (key,) = overrides
                found[(r["name"], key)] = found.get((r["name"], key), 0) + 1
        return [pair for pair, n in found.items() if n > 1]

    def save(self, out: str | os.PathLike) -> dict[str, str]:
        """Writes ``results.json``, ``compare.png`` and one ``sweep_<method>_<key>.png``
        per sweep into ``out`` (created if needed).

        Every file is written under a temporary name and renamed once all are
        written, so a failure leaves no complete-looking ``results.json``.
        """
        out = prepare_out(out)
        figures = {"figure": ("compare.png", self.figure())}
        for name, key in self.sweeps():
            figures[f"sweep_{name}_{key}"] = (
                f"sweep_{name}_{key}.png",
                sweep_figure([self], name, key),
            )
        paths = {"json": os.path.join(out, "results.json")}
        temporary: dict[str, str] = {}
        try:
            for label, (filename, fig) in figures.items():
                paths[label] = os.path.join(out, filename)
                temporary[label] = paths[label] + ".tmp.png"
                fig.savefig(temporary[label], dpi=120)
            temporary["json"] = paths["json"] + ".tmp"
            with open(temporary["json"], "w") as f:
                json.dump(self.to_json(), f, indent=1, allow_nan=False)
            for label, path in temporary.items():
                os.replace(path, paths[label])
        finally:
            for path in temporary.values():
                if os.path.exists(path):
                    os.remove(path)
        return paths


def _value(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def sweep_figure(results: Sequence[CompareResult], name: str, key: str) -> Any:
    """Test accuracy against one hyperparameter of one method, a panel per result.

    Each panel shows the rows of ``results[i]`` that set only ``key`` of method
    ``name`` (mean ± std over seeds), with horizontal lines for ``sgd`` and, when
    present, ``sam`` and ``name`` at its registry defaults; a dotted vertical line
    marks the registry default and a dashed one the constructor's (the paper's).

    Args:
      results: one :class:`CompareResult` per setting (clean, noisy labels, ...).
      name: the registry name of the method.
      key: the swept hyperparameter.

    Returns:
      A matplotlib figure.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(results), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(results)))
    default, paper = parameters(name)[key].default, parameters(name)[key].paper
    for ax, result in zip(axes, results, strict=True):
        points = sorted(
            (_value(r["overrides"][key]), r)
            for r in result.rows
            if r.get("name") == name and list(r.get("overrides") or {}) == [key]
        )
        xs = [x for x, _ in points]
        ys = [100 * r["test_acc_mean"] for _, r in points]
        es = [100 * r["test_acc_std"] for _, r in points]
        ax.errorbar(xs, ys, yerr=es, fmt="o-", color="C3", capsize=3, label=name)
        references = [(BASELINE, "C0", "-"), ("sam", "C2", "--")]
        if name not in (BASELINE, "sam"):
            references.append((name, "C1", ":"))
        for label, color, linestyle in references:
            row = next((r for r in result.rows if r["method"] == label), None)
            if row is not None:
                ax.axhline(
                    100 * row["test_acc_mean"],
                    color=color,
                    linestyle=linestyle,
                    lw=1,
                    label=f"{label} (registry defaults)",
                )
        if isinstance(default, int | float):
            ax.axvline(default, color="0.5", linestyle=":", lw=1)
        if isinstance(paper, int | float) and paper != default:
            ax.axvline(paper, color="0.5", linestyle="--", lw=1)
        if len(xs) > 2 and min(xs) > 0 and max(xs) / min(xs) >= 20:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_title(result.title(), fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"{name}: test accuracy against {key} (dotted: registry default)", fontsize=10)
    return fig
