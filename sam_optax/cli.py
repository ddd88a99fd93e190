"""The ``sam-optax`` command line (also ``python -m sam_optax``).

``sam-optax compare`` trains a small model with each method and prints what each
buys; see :func:`sam_optax.compare.run_compare`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

DEFAULT_OUT = "sam_optax_compare"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    from sam_optax import compare, registry

    parser = _Parser(
        prog="sam-optax",
        description="The sam_optax command line: train and compare sharpness-aware methods.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = commands.add_parser(
        "compare",
        help="train a small model with each method and compare accuracy, sharpness and cost",
        description="Train a small Flax model on built-in data with each method (chained in "
        "front of SGD with momentum, or AdamW, with cosine decay and weight decay) and print a "
        "Markdown table: test accuracy, training loss, top Hessian eigenvalue, gradient "
        "evaluations per step (counted), probe fraction, time per step and cost relative to sgd.",
        epilog="Examples: sam-optax compare --methods sam,asam:rho=1.0 --label-noise 0.4; "
        "sam-optax compare --methods sam --sweep looksam:alpha=0,0.1,0.3,0.7 --no-timing. "
        "A schedule is written as a call: sam:rho=linear(0,0.1,500).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default="mnist1d", help=f"one of: {', '.join(compare.DATASETS)}")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated registry names, each optionally followed by :key=value "
        "overrides (e.g. sgd,sam:rho=0.1,looksam:alpha=0.3:k=10); default: every method "
        "(only the sweep when --sweep is given); sgd is always run. Names: "
        f"{', '.join(registry.METHODS)}",
    )
    p.add_argument(
        "--sweep",
        action="append",
        default=None,
        metavar="NAME:KEY=V1,V2,...",
        help="a grid of one method's hyperparameters, e.g. looksam:alpha=0,0.3,0.7 "
        "(several keys give their product); may be repeated",
    )
    p.add_argument(
        "--base", default="sgd", help=f"base optimizer, one of: {', '.join(compare.BASES)}"
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per method")
    p.add_argument(
        "--steps", type=int, default=compare.DEFAULT_STEPS, help="training steps per run"
    )
    p.add_argument(
        "--batch-size", type=int, default=compare.DEFAULT_BATCH_SIZE, help="examples per step"
    )
    p.add_argument(
        "--label-noise",
        type=float,
        default=0.0,
        help="fraction of training labels flipped to another class, in [0, 1)",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="directory for results.json and figures")
    p.add_argument("--no-timing", action="store_true", help="skip the cost columns")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``sam-optax`` command line.

    Everything the user gave is checked before training: a bad argument, method
    specification or ``--out`` directory ends the command at once.

    Args:
      argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
      The exit status: 0 on success, 2 on bad input (after a one-line message
      on stderr that lists the valid choices), 1 when the results cannot be
      written (the table is printed first).

    Examples:
      >>> from sam_optax.cli import main
      >>> main(["compare", "--dataset", "cifar"])
      2
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    from sam_optax import compare

    try:
        out = compare.prepare_out(args.out)
        result = compare.run_compare(
            dataset=args.dataset,
            methods=args.methods,
            seeds=args.seeds,
            steps=args.steps,
            batch_size=args.batch_size,
            label_noise=args.label_noise,
            progress=not args.no_progress,
            sweep=args.sweep,
            base=args.base,
            timing=not args.no_timing,
        )
    except ValueError as err:
        print(f"sam-optax compare: error: {err}", file=sys.stderr)
        return 2
    c, env = result.config, result.environment
    print(
        f"{c['dataset']}, label noise {c['label_noise']:g}, {c['seeds']} seed(s) x "
        f"{c['steps']} steps of batch {c['batch_size']}, base {c['base']}, on {env['device']}\n"
    )
    print(result.to_markdown())
    try:
        paths = result.save(out)
    except OSError as err:
        print(
            f"sam-optax compare: error: cannot write the results to {out!r}: {err}", file=sys.stderr
        )
        return 1
    print(f"\nwrote {', '.join(sorted(paths.values()))}")
    return 0
