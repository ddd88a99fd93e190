"""The shared harness of the benchmark scripts: models, training steps, timing, tables.

Every optimizer comes from :mod:`sam_optax.registry`, so a method registered there is
benchmarked by every script with no edit here. The training step hands every update
the extra arguments that any method of the library may need (``grad_fn``,
``per_example_loss_fn``, ``batch`` and the clean per-example ``losses``); a
transformation ignores the ones it does not use.

Timing runs the contenders side by side in one process: each contender's training
step is compiled once (``jax.jit`` with the carry donated) and warmed. Then, in each
round, every contender runs ``CHUNK`` consecutive steps, blocked on the results, right
after the reference (ERM) has run its own ``CHUNK`` steps; the order of the contenders
rotates from round to round (``sam_optax._timing.paired_times``, which ``sam-optax
compare`` uses too). A contender's ratio to ERM is the median over rounds of (its
round time / the reference's round time just before). Pairing cancels what drifts
on a shared virtual machine, and every contender starts its turn after the same
predecessor: with one fixed cyclic order, each contender always followed the same
other one, and two identical contenders read up to 0.25x apart. ``CHUNK = 20`` holds a
whole number of periods of the ``k = 5`` methods, so skipped and probing steps are
averaged fairly, and is long enough that the cold caches at the start of a turn weigh
little.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.metadata
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from a checkout that is not installed
    sys.path.insert(0, str(ROOT))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import sam_optax  # noqa: E402
from sam_optax import _timing, registry  # noqa: E402
from sam_optax._timing import Timing  # noqa: E402

PyTree = Any
README = Path(__file__).resolve().parent / "README.md"
LEARNING_RATE = 0.01
NUM_DATA = 50_000  # bSAM's N (its noise scale); the batches are synthetic, N sets no cost
CHUNK = 20  # steps per timed call; a multiple of every period k = 5 that is benchmarked
CLASSES = 10


def base_optimizer() -> optax.GradientTransformation:
    """The base optimizer behind every method: SGD with momentum 0.9."""
    return optax.sgd(LEARNING_RATE, momentum=0.9)


# ----------------------------------------------------------------------------- models


class MLP(nn.Module):
    """A ReLU multilayer perceptron on flattened inputs."""

    hidden: Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(CLASSES)(x)


class CNN1D(nn.Module):
    """The MNIST-1D convolutional baseline: three strided 1-D convolutions and a head."""

    channels: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = x[..., None]  # [B, 40] -> [B, 40, 1]
        for kernel in (5, 3, 3):
            x = nn.relu(nn.Conv(self.channels, (kernel,), strides=2)(x))
        return nn.Dense(CLASSES)(x.reshape((x.shape[0], -1)))


class BasicBlock(nn.Module):
    """A ResNet basic block with BatchNorm."""

    filters: int
    strides: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        y = nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = norm()(nn.Conv(self.filters, (3, 3), use_bias=False)(y))
        if x.shape != y.shape:
            x = norm()(nn.Conv(self.filters, (1, 1), self.strides, use_bias=False)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A small ResNet for 32x32x3 images: a stem and one basic block per stage."""

    widths: Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.Conv(self.widths[0], (3, 3), strides=2, use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        for i, width in enumerate(self.widths):
            x = BasicBlock(width, 1 if i == 0 else 2)(x, train)
        return nn.Dense(CLASSES)(jnp.mean(x, axis=(1, 2)))


class Transformer(nn.Module):
    """A small pre-LayerNorm Transformer encoder that classifies token sequences."""

    vocab: int
    length: int
    dim: int
    heads: int
    layers: int

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = True) -> jax.Array:
        pos = self.param("pos", nn.initializers.normal(0.02), (self.length, self.dim))
        x = nn.Embed(self.vocab, self.dim)(tokens) + pos
        for _ in range(self.layers):
            x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x))
            h = nn.gelu(nn.Dense(4 * self.dim)(nn.LayerNorm()(x)))
            x = x + nn.Dense(self.dim)(h)
        return nn.Dense(CLASSES)(jnp.mean(nn.LayerNorm()(x), axis=1))


def _normal_batch(shape: tuple[int, ...]) -> Callable[[jax.Array, int], tuple]:
    def make(key, batch_size):
        kx, ky = jax.random.split(key)
        x = jax.random.normal(kx, (batch_size, *shape))
        return x, jax.random.randint(ky, (batch_size,), 0, CLASSES)

    return make


def _token_batch(vocab: int, length: int) -> Callable[[jax.Array, int], tuple]:
    def make(key, batch_size):
        kx, ky = jax.random.split(key)
        x = jax.random.randint(kx, (batch_size, length), 0, vocab)
        return x, jax.random.randint(ky, (batch_size,), 0, CLASSES)

    return make


@dataclasses.dataclass(frozen=True)
class Model:
    """A benchmark model: a Flax Linen module, its synthetic data and a batch size.

    The data are random inputs of the model's shape with random labels among 10
    classes: their values do not change what a step costs.
    """

    key: str
    title: str
    module: nn.Module
    make_batch: Callable[[jax.Array, int], tuple[jax.Array, jax.Array]]
    batch_size: int
    rounds: int

    def init(self, seed: int = 0) -> tuple[PyTree, PyTree]:
        """Returns ``(params, model_state)``; ``model_state`` holds BatchNorm statistics."""
        key = jax.random.key(seed)
        x, _ = self.make_batch(key, self.batch_size)
        variables = dict(_initialiser(self.module)(key, x))
        params = variables.pop("params")
        return params, variables

    def per_example_loss(
        self, params: PyTree, model_state: PyTree, batch: tuple
    ) -> tuple[jax.Array, PyTree]:
        """Per-example cross-entropy in training mode, and the new model state."""
        x, y = batch
        variables = {"params": params, **model_state}
        if model_state:
            logits, new_state = self.module.apply(
                variables, x, train=True, mutable=list(model_state)
            )
        else:
            logits, new_state = self.module.apply(variables, x, train=True), model_state
        return optax.softmax_cross_entropy_with_integer_labels(logits, y), new_state

    def batches(self, n: int, seed: int = 1) -> tuple[jax.Array, jax.Array]:
        """``n`` distinct batches stacked on a leading axis, on the default device."""
        keys = jax.random.split(jax.random.key(seed), n)
        return jax.vmap(lambda k: self.make_batch(k, self.batch_size))(keys)


@functools.cache
def _initialiser(module: nn.Module) -> Callable:
    """``module.init`` in inference mode, compiled once per module (on a 2-core CPU the
    first initialisation of the ResNet takes 13 s compiled, 18 s op by op)."""
    return jax.jit(functools.partial(module.init, train=False))


def models(quick: bool) -> list[Model]:
    """The four benchmark models; ``quick`` gives a small MLP only."""
    if quick:
        return [Model("mlp", "MLP", MLP((128, 128)), _normal_batch((784,)), 64, 5)]
    return [
        Model("mlp", "MLP", MLP((256, 256)), _normal_batch((784,)), 128, 20),
        Model("cnn1d", "MNIST-1D CNN", CNN1D(32), _normal_batch((40,)), 128, 20),
        Model(
            "resnet", "ResNet (32x32x3)", ResNet((8, 16, 32)), _normal_batch((32, 32, 3)), 32, 12
        ),
        Model(
            "transformer",
            "Transformer encoder",
            Transformer(vocab=1024, length=32, dim=64, heads=4, layers=2),
            _token_batch(1024, 32),
            16,
            12,
        ),
    ]


# ------------------------------------------------------------------- training steps


class StepInputs(NamedTuple):
    """What one training step can hand to ``tx.update`` besides the gradient."""

    grad_fn: Callable[[PyTree], PyTree]
    per_example_loss_fn: Callable[[PyTree, Any], jax.Array]
    batch: Any
    losses: jax.Array


def library_update_args(inputs: StepInputs) -> dict[str, Any]:
    """Every extra argument that a method of the library may use (ESAM's SDS included)."""
    return inputs._asdict()


def make_step(
    model: Model,
    tx: optax.GradientTransformation,
    update_args: Callable[[StepInputs], dict[str, Any]] = library_update_args,
) -> Callable:
    """A training step ``(carry, batch) -> (carry, loss)``.

    ``carry = (params, model_state, opt_state)``. The clean pass gives the loss,
    the per-example losses and the new BatchNorm statistics; ``grad_fn`` evaluates
    the same minibatch loss at other parameters (its statistics are discarded).
    """

    def step(carry, batch):
        params, model_state, opt_state = carry

        def loss_fn(p):
            losses, new_state = model.per_example_loss(p, model_state, batch)
            return jnp.mean(losses), (losses, new_state)

        (loss, (losses, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        inputs = StepInputs(
            grad_fn=jax.grad(lambda p: loss_fn(p)[0]),
            per_example_loss_fn=lambda p, b: model.per_example_loss(p, model_state, b)[0],
            batch=batch,
            losses=losses,
        )
        updates, opt_state = tx.update(grads, opt_state, params, **update_args(inputs))
        return (optax.apply_updates(params, updates), new_state, opt_state), loss

    return step


def init_carry(model: Model, tx: optax.GradientTransformation) -> tuple:
    """A fresh ``(params, model_state, opt_state)`` whose buffers no one else holds."""
    params, model_state = model.init()
    carry = (params, model_state, tx.init(params))
    return jax.tree.map(lambda x: jnp.array(x, copy=True), carry)


# ------------------------------------------------------------------------ contenders


@dataclasses.dataclass(frozen=True)
class Contender:
    """One optimizer to benchmark.

    Attributes:
      label: its name in the tables.
      method: the registry name it is built from.
      make: ``total_steps -> tx``.
      grads_per_step: as in the registry (``"2"``, ``"1 + 1/k"``, ...).
      target: ``probe_fraction -> bound on the ratio to ERM`` or ``None``.
      target_text: the target as written in the table.
    """

    label: str
    method: str
    make: Callable[[int], optax.GradientTransformation]
    grads_per_step: str
    target: Callable[[float], float] | None = None
    target_text: str = "—"


def _registry_maker(name: str, **overrides: Any) -> Callable[[int], optax.GradientTransformation]:
    def make(total_steps):
        return registry.make_optimizer(
            name,
            base_optimizer(),
            learning_rate=LEARNING_RATE,
            total_steps=total_steps,
            num_data=NUM_DATA,
            **overrides,
        )

    return make


def registry_contenders() -> list[Contender]:
    """Every registered method with its paper defaults; two-gradient ones target 2.05x."""
    out = []
    for name, method in registry.METHODS.items():
        two = method.grads_per_step.strip() == "2"
        out.append(
            Contender(
                name,
                name,
                _registry_maker(name),
                method.grads_per_step,
                (lambda p: 2.05) if two else None,
                "≤ 2.05x" if two else "—",
            )
        )
    return out


def efficient_contenders() -> tuple[list[Contender], list[str]]:
    """The efficient configurations of issue 5 with their targets, and the missing ones.

    LookSAM with ``k = 5``, SAM every 5 steps, ESAM with ``gamma = 0.5`` and AE-SAM
    carry the targets of the issue; SAM with a Bernoulli(0.2) policy and every other
    registered method that is not a two-gradient method are measured without one.
    A configuration whose method or policy is not in the library is reported missing.
    """
    policies = sam_optax.policies
    wanted: list[tuple[str, str, Callable[[], dict], str, Callable[[float], float] | None, str]] = [
        ("looksam (k=5)", "looksam", lambda: {"k": 5}, "1 + 1/5", lambda p: 1.3, "≤ 1.3x"),
        (
            "sam every 5",
            "sam",
            lambda: {"policy": policies.every(5)},
            "1 + 1/5",
            lambda p: 1.3,
            "≤ 1.3x",
        ),
        ("esam (gamma=0.5)", "esam", lambda: {"gamma": 0.5}, "1 + 0.5", lambda p: 1.75, "≤ 1.75x"),
        ("ae_sam", "ae_sam", dict, "1 + p", lambda p: 1.1 + p, "≤ 1.1 + p"),
        (
            "sam bernoulli(0.2)",
            "sam",
            lambda: {"policy": policies.bernoulli(0.2)},
            "1 + 0.2",
            None,
            "—",
        ),
    ]
    out, missing = [], []
    for label, name, overrides, grads, target, text in wanted:
        if name not in registry.METHODS:
            missing.append(label)
            continue
        try:
            kwargs = overrides()
            _registry_maker(name, **kwargs)(100)
        except (AttributeError, TypeError):  # the policy or the argument is not there yet
            missing.append(label)
            continue
        out.append(Contender(label, name, _registry_maker(name, **kwargs), grads, target, text))
    covered = {c.method for c in out}
    for c in registry_contenders():
        if c.method not in covered and c.method != "sgd" and c.grads_per_step.strip() != "2":
            out.append(c)
    return out, missing


def erm_contender() -> Contender:
    """The same training step with no sharpness-aware transformation."""
    return Contender("sgd (ERM)", "sgd", _registry_maker("sgd"), "1")


# --------------------------------------------------------------------------- measures


def progress(message: str) -> None:
    """A progress line on stderr, so that the tables on stdout stay clean."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def tree_bytes(tree: PyTree) -> int:
    """Bytes held by the arrays of a pytree."""
    return sum(int(jnp.asarray(x).nbytes) for x in jax.tree.leaves(tree))


def params_sized_bytes(tree: PyTree) -> int:
    """Bytes held by the non-scalar arrays of a pytree (counters and scalars excluded)."""
    return sum(int(jnp.asarray(x).nbytes) for x in jax.tree.leaves(tree) if jnp.ndim(x) > 0)


WARMUP = 2  # untimed calls of each runner before the timed rounds


def total_steps(model: Model) -> int:
    """Steps a runner takes over a whole timing run (AE-SAM's ``total_steps``)."""
    return (model.rounds + WARMUP) * CHUNK


class Built(NamedTuple):
    """A training step compiled once for one model and one optimizer.

    Attributes:
      tx: the optimizer.
      step: the compiled ``(carry, batch) -> (carry, loss)``, its carry donated.
      compile_s: seconds to lower and compile it.
      temp_bytes: XLA's temporary bytes (``None`` where the backend has no analysis).
      argument_bytes: XLA's argument bytes (likewise).
    """

    tx: optax.GradientTransformation
    step: Callable
    compile_s: float
    temp_bytes: int | None
    argument_bytes: int | None


_BUILT: dict[tuple[str, str], Built] = {}


def build(
    model: Model,
    contender: Contender,
    update_args: Callable[[StepInputs], dict[str, Any]] = library_update_args,
) -> Built:
    """Compiles ``contender``'s training step on ``model``, once per process.

    The step-time and memory scripts share the compiled step (and its compile time)
    when ``run_all`` runs them in one process.
    """
    key = (model.key, contender.label)
    if key not in _BUILT:
        tx = contender.make(total_steps(model))
        carry = init_carry(model, tx)
        batch = jax.tree.map(lambda x: x[0], model.batches(1))
        # ERM, the first step built for a model, is compiled twice and timed the
        # second time: the first compile of a model pays one-off tracing costs.
        for _ in range(2 if contender.method == "sgd" else 1):
            start = time.perf_counter()
            step = jax.jit(make_step(model, tx, update_args), donate_argnums=0)
            compiled = step.lower(carry, batch).compile()
            seconds = time.perf_counter() - start
        stats = compiled.memory_analysis()
        _BUILT[key] = Built(
            tx,
            compiled,
            seconds,
            None if stats is None else int(stats.temp_size_in_bytes),
            None if stats is None else int(stats.argument_size_in_bytes),
        )
    return _BUILT[key]


class Runner:
    """Runs a compiled step over a list of batches with its own carry, then blocks.

    ``calls_per_step`` is 2 for an optimizer that needs two training steps for one
    step of the method (``optax.contrib.sam`` in transparent mode): each batch is
    then used twice in a row and the time is per method step.
    """

    def __init__(self, label: str, model: Model, built: Built, calls_per_step: int = 1) -> None:
        self.label = label
        self.carry = init_carry(model, built.tx)
        self._step = built.step
        stacked = model.batches(CHUNK)
        self._batches = [
            jax.tree.map(lambda x, i=i: x[i], stacked)
            for i in range(CHUNK)
            for _ in range(calls_per_step)
        ]

    def __call__(self) -> None:
        loss = None
        for batch in self._batches:
            self.carry, loss = self._step(self.carry, batch)
        jax.block_until_ready((self.carry, loss))


def paired_times(reference: Runner, runners: Sequence[Runner], rounds: int) -> dict[str, Timing]:
    """Every runner timed right after a turn of ``reference`` (see ``sam_optax._timing``)."""
    return _timing.paired_times(reference, runners, rounds, steps=CHUNK, warmup=WARMUP)


# ---------------------------------------------------------------------------- tables


class Section(NamedTuple):
    """A generated section of ``benchmarks/README.md``: its marker key and Markdown."""

    key: str
    markdown: str


def platform(devices: Sequence[Any] | None = None) -> str:
    """The platform (``cpu``, ``gpu``, ``tpu``) of ``devices``, by default JAX's devices."""
    return (devices or jax.devices())[0].platform


def environment(quick: bool, devices: Sequence[Any] | None = None) -> str:
    """One line naming the device, the versions, the date and the mode.

    ``devices``: the devices the programs are compiled for, by default JAX's own;
    a TPU topology with no chip attached (``scale.py --tpu``) is named as such.
    """
    devices = devices or jax.devices()
    device = devices[0]
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}" for name in ("jax", "jaxlib", "optax", "flax")
    )
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    mode = "quick mode (smaller models, few rounds)" if quick else "full mode"
    return (
        f"Device: {device.device_kind} ({device.platform}, {len(devices)} device(s)"
        f"{'' if devices[0] in jax.devices() else ', compiled for a topology, no chip attached'}); "
        f"{versions}, sam_optax {sam_optax.__version__}; {date}; {mode}."
    )


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(value: float, bound: float | None) -> str:
    """``pass`` / ``FAIL`` against an upper bound, ``—`` without one."""
    if bound is None:
        return "—"
    return "pass" if value <= bound else "FAIL"


def section(
    name: str, title: str, quick: bool, body: str, devices: Sequence[Any] | None = None
) -> Section:
    """A section keyed ``name-platform``, so a GPU table sits beside the CPU one.

    ``devices``: those the section's programs ran on or were compiled for.
    """
    key = f"{name}-{platform(devices)}"
    text = f"### {title} — {platform(devices)}\n\n{environment(quick, devices)}\n\n{body}\n"
    return Section(key, text)


def record(path: Path, sections: Iterable[Section]) -> None:
    """Writes each section between its markers in ``path``, keeping everything else.

    A marker counts only as a line of its own, so prose that quotes a marker is left
    alone. A section whose markers are absent is appended at the end of the file.
    """
    text = path.read_text() if path.exists() else ""
    for key, markdown in sections:
        begin, end = f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"
        block = f"{begin}\n{markdown.strip()}\n{end}"
        found = re.search(rf"^{re.escape(begin)}$.*?^{re.escape(end)}$", text, re.M | re.S)
        if found:
            text = text[: found.start()] + block + text[found.end() :]
        else:
            text = f"{text.rstrip()}\n\n{block}\n" if text.strip() else f"{block}\n"
    path.write_text(text)


def parse_args(description: str, argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line shared by every script."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small models, few rounds")
    parser.add_argument(
        "--record", action="store_true", help="write the tables into the README between markers"
    )
    parser.add_argument("--readme", type=Path, default=README, help="the file --record writes")
    return parser.parse_args(argv)


def main(
    run: Callable[[bool], list[Section]], description: str, argv: Sequence[str] | None
) -> None:
    """Runs a script: prints its sections and, with ``--record``, writes them."""
    args = parse_args(description, argv)
    sections = run(args.quick)
    for s in sections:
        print(s.markdown, flush=True)
    if args.record:
        record(args.readme, sections)
        print(f"recorded {', '.join(s.key for s in sections)} in {args.readme}")
