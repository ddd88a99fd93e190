"""Records a sweep of every method's main hyperparameters with ``sam-optax compare``.

Each method's grid (:data:`GRIDS`: ``rho`` for every method that has one, and the
method's own hyperparameters, at least four values including the paper's) is run by
:func:`sam_optax.compare.run_compare` in each setting of :data:`SETTINGS` (MNIST-1D
clean and with 40 % label noise on the SGD base; MNIST-1D clean on an AdamW base for
the methods tuned with adaptive optimizers), 3 seeds × 1000 steps, with ``sgd`` and
``sam`` at their registry defaults as reference lines. Accuracy is what a sweep
measures; it is not timed (the cost of each method is in ``sam-optax compare``).

Each (setting, method, hyperparameter) run is saved to
``benchmarks/sweeps/<setting>/<method>_<key>.json``, and every registry method at its
defaults to ``benchmarks/sweeps/<setting>/defaults.json`` (the reference lines); a run is
skipped when its file exists, so the recording can be stopped, resumed, and split over
processes (``--settings``, ``--methods``, ``--keys``). The method's own hyperparameters
are swept before ``rho`` (``--keys own`` / ``--keys rho``), so that a registry default
changed on the evidence of the first can be in force when ``rho`` is swept.
``--report`` then writes the tables into ``benchmarks/SWEEPS.md`` and one figure per
method and hyperparameter into ``benchmarks/sweeps/<method>_<key>.png``, from the saved
runs only.

    python benchmarks/sweep.py                            # run what is missing, then report
    python benchmarks/sweep.py --settings noisy --methods looksam,gsam --keys own
    python benchmarks/sweep.py --report                   # tables and figures only
    python benchmarks/sweep.py --quick --out /tmp/sweeps  # a tiny run (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sam_optax import registry
from sam_optax.compare import CompareResult, parameters, run_compare, sweep_figure

HERE = Path(__file__).resolve().parent
OUT = HERE / "sweeps"
REPORT = HERE / "SWEEPS.md"

# setting -> run_compare keywords.
SETTINGS: dict[str, dict[str, Any]] = {
    "clean": {"dataset": "mnist1d", "label_noise": 0.0, "base": "sgd"},
    "noisy": {"dataset": "mnist1d", "label_noise": 0.4, "base": "sgd"},
    "adamw": {"dataset": "mnist1d", "label_noise": 0.0, "base": "adamw"},
}

# method -> {hyperparameter: values}; each hyperparameter is swept alone, the others at
# the registry's defaults. Every list holds the paper's value.
GRIDS: dict[str, dict[str, list[str]]] = {
    "looksam": {"alpha": ["0", "0.1", "0.3", "0.5", "0.7"], "rho": ["0.02", "0.05", "0.1", "0.2"]},
    "ae_looksam": {
        "alpha": ["0", "0.05", "0.1", "0.2", "0.3", "0.7"],
        "rho": ["0.02", "0.05", "0.1", "0.2"],
    },
    "wsam": {"gamma": ["0.5", "0.7", "0.8", "0.9", "0.95"], "rho": ["0.02", "0.05", "0.1", "0.2"]},
    "wsam_coupled": {
        "gamma": ["0.5", "0.6", "0.7", "0.8", "0.9"],
        "rho": ["0.02", "0.05", "0.1", "0.2"],
    },
    "gsam": {"alpha": ["0", "0.1", "0.2", "0.4", "0.7"], "rho": ["0.02", "0.05", "0.1", "0.2"]},
    "esam": {
        "beta": ["0.3", "0.5", "0.6", "0.8", "1"],
        "gamma": ["0.25", "0.5", "0.75", "1"],
        "rho": ["0.02", "0.05", "0.1", "0.2"],
    },
    "sam": {"rho": ["0.01", "0.02", "0.05", "0.1", "0.2"]},
    "sampa": {"lam": ["0", "0.1", "0.2", "0.5"], "rho": ["0.02", "0.05", "0.1", "0.2"]},
    "rwp": {"lam": ["0.25", "0.5", "0.75", "1"], "rho": ["0.005", "0.01", "0.015", "0.02", "0.05"]},
    "asam": {"rho": ["0.1", "0.2", "0.5", "1", "2"]},
    "fisher_sam": {"rho": ["0.02", "0.05", "0.1", "0.2"]},
    "vasso": {"theta": ["0.2", "0.5", "0.9", "0.99"], "rho": ["0.02", "0.05", "0.1", "0.2"]},
    "friendly_sam": {
        "sigma": ["0", "0.5", "1", "2"],
        "lmbda": ["0", "0.6", "0.9", "0.95"],
        "rho": ["0.02", "0.05", "0.1", "0.2"],
    },
    "gcsam": {"rho": ["0.02", "0.05", "0.1", "0.2"]},
    "ssam_f": {"sparsity": ["0.2", "0.5", "0.8", "0.9"], "rho": ["0.02", "0.05", "0.1", "0.2"]},
    "ssam_d": {
        "sparsity": ["0.2", "0.5", "0.8", "0.9"],
        "drop_rate": ["0.1", "0.25", "0.5", "0.75"],
        "rho": ["0.02", "0.05", "0.1", "0.2"],
    },
    "sam_every_k": {"k": ["2", "5", "10", "20"], "rho": ["0.02", "0.05", "0.1", "0.2"]},
    "rst": {"p": ["0.1", "0.25", "0.5", "0.75"], "rho": ["0.02", "0.05", "0.1", "0.2"]},
    "ae_sam": {"rho": ["0.02", "0.05", "0.1", "0.2"]},
    "msam": {"rho": ["0.1", "0.3", "1", "3"], "momentum": ["0.5", "0.8", "0.9", "0.95"]},
    "swa": {"start_fraction": ["0.25", "0.5", "0.75", "0.9"]},
    "mesa": {
        "weight": ["0.1", "0.3", "0.8", "1.6"],
        "temperature": ["1", "2", "5", "10"],
        "decay": ["0.95", "0.98", "0.99", "0.9998"],
        "start_fraction": ["0", "0.067", "0.3", "0.5"],
    },
    "bsam": {"alpha": ["0.25", "0.5", "1", "2"], "rho": ["0.003", "0.01", "0.03", "0.1"]},
    "wasam": {"rho": ["0.02", "0.05", "0.1", "0.2"]},
    "gam": {
        "rho_prime": ["0.01", "0.03", "0.05", "0.1"],
        "gamma": ["0", "0.02", "0.05", "0.1"],
        "rho": ["0.05", "0.1", "0.2", "0.5"],
    },
    "lookbehind_sam": {"k": ["1", "2", "3", "5"], "rho": ["0.02", "0.05", "0.1", "0.2"]},
}

# The recorded comparison's runs, which hold every method at its defaults.
RECORDED = {
    "clean": HERE / "compare" / "mnist1d-noise0" / "results.json",
    "noisy": HERE / "compare" / "mnist1d-noise0.4" / "results.json",
}

# The AdamW setting sweeps the methods whose papers tuned them with adaptive
# optimizers (LookSAM: LAMB/Adam on ViTs; GSAM and ESAM: AdamW on ViTs; WSAM's
# decoupled mode), and SAM for reference. MSAM is a complete SGD optimizer: no AdamW form.
ADAMW_METHODS = ("looksam", "ae_looksam", "gsam", "wsam", "esam", "sam")


def plan(settings: Sequence[str], methods: Sequence[str], keys: str) -> list[tuple[str, str, str]]:
    """The ``(setting, method, key)`` runs to make: the methods' own keys, then ``rho``."""
    phases = {"own": [False], "rho": [True], "all": [False, True]}[keys]
    return [
        (setting, method, key)
        for is_rho in phases
        for setting in settings
        for method in methods
        for key in GRIDS[method]
        if (key == "rho") == is_rho and (setting != "adamw" or method in ADAMW_METHODS)
    ]


def _save(result: CompareResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.to_json(), indent=1, allow_nan=False))
    os.replace(tmp, path)
    print(f"saved {path}", flush=True)


def _run(path: Path, setting: str, *, seeds: int, steps: int, **selection: Any) -> None:
    """Trains ``selection`` (``methods``, ``sweep``) in ``setting``, untimed, unless saved."""
    if not path.exists():
        result = run_compare(
            seeds=seeds,
            steps=steps,
            progress=sys.stderr.isatty(),
            timing=False,
            **SETTINGS[setting],
            **selection,
        )
        _save(result, path)


def reference_path(setting: str, out: Path) -> Path:
    """Where the run of every method at its defaults in ``setting`` is (or will be) saved.

    For the settings of the recorded comparison it is that comparison's
    ``results.json`` (``python benchmarks/record_compare.py --out benchmarks/compare``,
    the same training, timed); otherwise a run of this script's own.
    """
    if out == OUT and setting in RECORDED:
        return RECORDED[setting]
    return out / setting / "defaults.json"


def references(
    setting: str, out: Path, methods: Sequence[str] | None, *, seeds: int, steps: int
) -> Path:
    """Runs every registry method (or ``sam`` and ``methods``) at its defaults in
    ``setting`` (the reference lines), unless saved; not for the recorded settings."""
    path = reference_path(setting, out)
    if setting == "adamw":
        methods = [m for m in methods or ADAMW_METHODS if m in ADAMW_METHODS]
    chosen = None if methods is None else ["sam", *methods]
    _run(path, setting, seeds=seeds, steps=steps, methods=chosen)
    return path


def run_one(setting: str, method: str, key: str, out: Path, *, seeds: int, steps: int) -> None:
    """Runs one method's sweep of one key in one setting, unless it is saved already.

    The registry's default value is not run again: the reference run holds it.
    """
    default = float(parameters(method)[key].default)
    values = [v for v in GRIDS[method][key] if float(v) != default]
    sweep = f"{method}:{key}={','.join(values)}"
    _run(
        out / setting / f"{method}_{key}.json",
        setting,
        seeds=seeds,
        steps=steps,
        methods="sgd",
        sweep=sweep,
    )


def load(path: Path) -> CompareResult:
    """A saved run, as a :class:`CompareResult` (``null`` numbers read as NaN)."""
    data = json.loads(path.read_text())
    for row in data["rows"]:
        for key, value in row.items():
            if value is None:
                row[key] = float("nan")
    return CompareResult(data["rows"], data["curve_steps"], data["config"], data["environment"])


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "—"
    text = f"{100 * row['test_acc_mean']:.1f} ± {100 * row['test_acc_std']:.1f}"
    return text if row.get("finite", True) else f"{text} (diverged)"


def report(out: Path, report_path: Path, settings: Sequence[str], *, write: bool = True) -> str:
    """The tables (Markdown) from the saved runs; with ``write``, also writes them to
    ``report_path`` and the figures into ``out``."""
    saved: dict[tuple[str, str], CompareResult] = {}
    for setting in settings:
        folder = out / setting
        reference = reference_path(setting, out)
        if not reference.exists():
            continue
        defaults = load(reference)
        for method in GRIDS:
            runs = [
                load(p) for key in GRIDS[method] if (p := folder / f"{method}_{key}.json").exists()
            ]
            if runs:
                rows = [*defaults.rows, *(r for run in runs for r in run.rows if r["overrides"])]
                saved[(setting, method)] = CompareResult(
                    rows, defaults.curve_steps, defaults.config, defaults.environment
                )
    if not saved:
        raise SystemExit(f"no saved runs under {out}; run the sweep first")
    first = next(iter(saved.values()))
    env = first.environment
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines = [
        "# Hyperparameter sweeps",
        "",
        "Generated by `python benchmarks/sweep.py` from the runs saved in "
        f"`benchmarks/sweeps/`; device {env['device']} ({env['cpu_count']} CPUs visible); "
        f"{versions}; first run {env['date']}. Do not edit by hand.",
        "",
        f"MNIST-1D, {first.config['seeds']} seeds × {first.config['steps']} steps of batch "
        f"{first.config['batch_size']}; test accuracy (%) as mean ± std over seeds. Each "
        "hyperparameter is varied alone, the others at the registry's defaults; the row "
        "marked (default) and the reference lines are the runs of every method at its "
        "registry defaults (for clean and noisy, the recorded comparison in "
        "`benchmarks/compare/`). Figures: dotted vertical line, the registry's default; "
        "dashed, the paper's where it differs. Settings: "
        + "; ".join(
            f"**{s}**: label noise {SETTINGS[s]['label_noise']:g}, "
            + next(r.config["base_description"] for (t, _), r in saved.items() if t == s)
            for s in settings
            if any(t == s for t, _ in saved)
        )
        + ".",
    ]
    methods = list(dict.fromkeys(m for _, m in saved))
    for method in methods:
        defaults = parameters(method)
        lines += ["", f"## {method}", ""]
        present = [s for s in settings if (s, method) in saved]
        ref = {
            s: {r["method"]: r for r in saved[(s, method)].rows if not r["overrides"]}
            for s in present
        }
        lines.append(
            "References (registry defaults): "
            + "; ".join(
                f"{s}: sgd {_cell(ref[s].get('sgd'))}, sam {_cell(ref[s].get('sam'))}"
                + (f", {method} {_cell(ref[s].get(method))}" if method != "sam" else "")
                for s in present
            )
            + "."
        )
        for key, values in GRIDS[method].items():
            if not any(r["overrides"].get(key) for s in present for r in saved[(s, method)].rows):
                continue
            lines += ["", f"| {key} | " + " | ".join(present) + " |"]
            lines.append("|---|" + "---|" * len(present))
            for value in values:
                is_default = float(value) == float(defaults[key].default)
                label = method if is_default else f"{method}:{key}={value}"
                cells = []
                for s in present:
                    row = next((r for r in saved[(s, method)].rows if r["method"] == label), None)
                    cells.append(_cell(row))
                mark = " (default)" if is_default else ""
                lines.append(f"| {value}{mark} | " + " | ".join(cells) + " |")
            name = f"{method}_{key}.png"
            if write:
                figure = sweep_figure([saved[(s, method)] for s in present], method, key)
                figure.savefig(out / name, dpi=100)
            link = os.path.relpath(out / name, report_path.parent)
            lines += ["", f"![{method}: accuracy against {key}]({link})"]
    text = "\n".join(lines) + "\n"
    if write:
        report_path.write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the missing sweeps (unless ``--report``), then writes tables and figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--methods", default=",".join(GRIDS))
    parser.add_argument("--keys", choices=("own", "rho", "all"), default="all")
    parser.add_argument("--report", action="store_true", help="only write tables and figures")
    parser.add_argument("--no-report", action="store_true", help="only run")
    parser.add_argument("--quick", action="store_true", help="1 seed × 20 steps")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    settings = [s for s in args.settings.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    for name, known in (("setting", SETTINGS), ("method", GRIDS)):
        unknown = [v for v in (settings if name == "setting" else methods) if v not in known]
        if unknown:
            parser.error(f"unknown {name} {unknown}; choose from {', '.join(known)}")
    missing = [m for m in registry.METHODS if m not in GRIDS and m != "sgd"]
    if missing:
        parser.error(f"registry methods without a grid in GRIDS: {missing}")
    seeds, steps = (1, 20) if args.quick else (3, 1000)
    if not args.report:
        for setting in settings:
            if args.out != OUT or setting not in RECORDED:  # recorded ones come from compare
                # Every method in the full run; only those swept in a quick one.
                swept = methods if args.quick else None
                references(setting, args.out, swept, seeds=seeds, steps=steps)
        for setting, method, key in plan(settings, methods, args.keys):
            run_one(setting, method, key, args.out, seeds=seeds, steps=steps)
    if not args.no_report:
        report_path = args.out / "SWEEPS.md" if args.out != OUT else REPORT
        print(report(args.out, report_path, settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
