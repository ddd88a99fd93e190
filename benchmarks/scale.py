"""SAM at real model sizes on 8 devices, read from the compiled programs (nothing is run).

Each training step is traced, lowered and compiled for abstract inputs
(``jax.ShapeDtypeStruct`` with shardings: no parameter, batch or optimizer state is
allocated) with :func:`sam_optax.profile_step`, on a mesh of every device of the
default backend (8 fake CPU devices here: ``jax_num_cpu_devices`` is set before the
backend starts). Models: ViT-B/16 (86 M parameters, 224x224, batch 8 per device), a
GPT-2-small-like decoder (124 M, 1024 tokens, 2 sequences per device) and ResNet-50
(25 M, BatchNorm, 224x224, batch 8 per device), all float32 with SGD with momentum
behind every method. Layouts:

- ``dp``: data parallel, params and optimizer state replicated, batch sharded;
- ``fsdp``: params, optimizer state and BatchNorm statistics sharded over their
  largest dimension that divides by the number of devices, batch sharded (XLA's
  partitioner inserts the gathers);
- ``shard_map``: params replicated, each device differentiates its own batch
  (m-sharpness, ``m`` = per-device batch, ``docs/multi_device.md`` section 2); the
  methods are built with ``axis_name`` and average their output; ERM and the methods
  without ``axis_name`` (MSAM, SWA, MESA, SAMPa, bSAM) average every gradient first,
  ``optax.contrib.sam`` averages its probe gradient.

Usage::

    python benchmarks/scale.py [--quick] [--record] [--models vit_b16,gpt2,resnet50]
                               [--layouts dp,fsdp,shard_map] [--methods all|name,...]
                               [--tpu v5e:2x4]

Every (model, layout) pair is its own section of ``benchmarks/README.md``
(``scale-<model>-<layout>-<platform>``), so a run over some of them records those
only. ``--tpu TOPOLOGY`` compiles for a TPU topology instead of the CPU devices,
with libtpu's compile-only client (``pip install libtpu``; no TPU is needed): the
sections are then ``-tpu`` ones, read from the TPU compiler's programs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before the backend starts

import flax.linen as nn  # noqa: E402
import harness  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import sam_optax  # noqa: E402
from sam_optax import registry  # noqa: E402
from sam_optax.profile import COLLECTIVES, StepProfile  # noqa: E402

PyTree = Any
AXIS = "data"
MiB = 2**20

# Targets of the tables (see the notes under each table).
TWO_GRAD_FLOPS = 2.02  # FLOPs of a two-gradient method, x ERM
SAM_EXTRA_TEMP = 1.0  # SAM's extra temp bytes per device, x the per-device params bytes
COND_TRACE = 1.3  # trace time of a method that probes inside lax.cond, x SAM's
TWO_GRAD_COMPILE, COND_COMPILE = 2.5, 3.0  # compile time, x ERM
SMALL_COLLECTIVES = 4  # SAM: at most 2x ERM's collectives of each kind plus this many
COND_METHODS = {"looksam", "sam_every_k", "ae_sam", "ae_looksam", "rst"}


# ----------------------------------------------------------------------------- models


class Block(nn.Module):
    """A pre-LayerNorm Transformer block (GPT-2 and ViT)."""

    heads: int
    causal: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2])) if self.causal else None
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x), mask=mask)
        h = nn.gelu(nn.Dense(4 * dim)(nn.LayerNorm()(x)))
        return x + nn.Dense(dim)(h)


class ViT(nn.Module):
    """A Vision Transformer: patch embedding, class token, learned positions, blocks."""

    patch: int
    dim: int
    depth: int
    heads: int
    classes: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.Conv(self.dim, (self.patch, self.patch), self.patch, padding="VALID")(x)
        x = x.reshape((x.shape[0], -1, self.dim))
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.dim))
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.dim)), x], axis=1)
        x = x + self.param("pos", nn.initializers.normal(0.02), x.shape[1:])
        for _ in range(self.depth):
            x = Block(self.heads)(x)
        return nn.Dense(self.classes)(nn.LayerNorm()(x)[:, 0])


class GPT2(nn.Module):
    """A GPT-2-like decoder: token and position embeddings, causal blocks, tied head."""

    vocab: int
    length: int
    dim: int
    depth: int
    heads: int

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = True) -> jax.Array:
        embed = nn.Embed(self.vocab, self.dim)
        x = embed(tokens) + self.param("pos", nn.initializers.normal(0.01), (self.length, self.dim))
        for _ in range(self.depth):
            x = Block(self.heads, causal=True)(x)
        return embed.attend(nn.LayerNorm()(x))


class Bottleneck(nn.Module):
    """A ResNet-50 bottleneck block with BatchNorm."""

    filters: int
    strides: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        y = nn.relu(norm()(nn.Conv(self.filters, (1, 1), use_bias=False)(x)))
        y = nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(y)
        y = nn.relu(norm()(y))
        y = norm()(nn.Conv(4 * self.filters, (1, 1), use_bias=False)(y))
        if x.shape != y.shape:
            x = norm()(nn.Conv(4 * self.filters, (1, 1), self.strides, use_bias=False)(x))
        return nn.relu(x + y)


class ResNet50(nn.Module):
    """ResNet-50 (v1.5: the stride on the 3x3 convolution of a block)."""

    stages: Sequence[int]
    width: int
    classes: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.Conv(self.width, (7, 7), 2, use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        for i, blocks in enumerate(self.stages):
            for j in range(blocks):
                x = Bottleneck(self.width * 2**i, 2 if i > 0 and j == 0 else 1)(x, train)
        return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


@dataclasses.dataclass(frozen=True)
class LanguageModel(harness.Model):
    """A next-token model: an example's loss is the mean over its tokens."""

    def per_example_loss(self, params, model_state, batch):
        losses, new_state = super().per_example_loss(params, model_state, batch)
        return jnp.mean(losses, axis=-1), new_state


def _images(size: int, classes: int) -> Callable:
    def make(key, batch_size):
        kx, ky = jax.random.split(key)
        x = jax.random.normal(kx, (batch_size, size, size, 3))
        return x, jax.random.randint(ky, (batch_size,), 0, classes)

    return make


def _tokens(vocab: int, length: int) -> Callable:
    def make(key, batch_size):
        tokens = jax.random.randint(key, (batch_size, length + 1), 0, vocab)
        return tokens[:, :-1], tokens[:, 1:]

    return make


def models(quick: bool, devices: int) -> dict[str, harness.Model]:
    """The three models by key; ``quick``: tiny ones of the same architectures."""
    if quick:
        vit = ViT(patch=8, dim=32, depth=1, heads=2, classes=10)
        gpt = GPT2(vocab=256, length=32, dim=32, depth=1, heads=2)
        resnet = ResNet50(stages=(1,), width=8, classes=10)
        image, vocab, length, per_device = 32, 256, 32, (2, 2)
    else:
        vit = ViT(patch=16, dim=768, depth=12, heads=12, classes=1000)
        gpt = GPT2(vocab=50257, length=1024, dim=768, depth=12, heads=12)
        resnet = ResNet50(stages=(3, 4, 6, 3), width=64, classes=1000)
        image, vocab, length, per_device = 224, 50257, 1024, (8, 2)
    classes = vit.classes
    return {
        "vit_b16": harness.Model(
            "vit_b16", "ViT-B/16", vit, _images(image, classes), per_device[0] * devices, 0
        ),
        "gpt2": LanguageModel(
            "gpt2", "GPT-2 small", gpt, _tokens(vocab, length), per_device[1] * devices, 0
        ),
        "resnet50": harness.Model(
            "resnet50", "ResNet-50", resnet, _images(image, classes), per_device[0] * devices, 0
        ),
    }


# ------------------------------------------------------------------------ contenders


@dataclasses.dataclass(frozen=True)
class Contender:
    """One optimizer of the tables.

    Attributes:
      label: its name in the tables.
      method: the registry name (``sgd`` for ERM).
      make: ``axis_name -> tx``; ``axis_name`` is ``None`` under ``jit``.
      update_args: the extra arguments of ``tx.update`` from the step's inputs;
        ``None`` for ``optax.contrib.sam``, whose ``grad_fn`` takes ``(params, i)``.
      local: under ``shard_map``, whether the method receives this device's
        gradient (m-sharpness) rather than the average.
    """

    label: str
    method: str
    make: Callable[[str | None], optax.GradientTransformation]
    update_args: Callable[[harness.StepInputs], dict[str, Any]] | None = harness.library_update_args
    local: bool = True


def _registry(
    name: str, label: str | None = None, jit_overrides: dict | None = None, **overrides: Any
) -> Contender:
    """A registry method; ``jit_overrides`` apply under ``jax.jit`` only (not ``shard_map``)."""
    constructor = registry.METHODS[name].constructor
    parameters = inspect.signature(constructor).parameters if constructor else {}
    takes_axis = "axis_name" in parameters

    def make(axis_name):
        extra = {"axis_name": axis_name} if takes_axis and axis_name else {}
        extra |= (jit_overrides or {}) if axis_name is None else {}
        return registry.make_optimizer(
            name,
            harness.base_optimizer(),
            learning_rate=harness.LEARNING_RATE,
            total_steps=1000,
            num_data=harness.NUM_DATA,
            **overrides,
            **extra,
        )

    return Contender(label or name, name, make, local=takes_axis)


def _contrib_sam(axis_name: str | None) -> optax.GradientTransformation:
    """``optax.contrib.sam`` in opaque mode with SAM's normalised ascent (the registry's rho)."""
    adversary = optax.chain(
        optax.contrib.normalize(), optax.sgd(registry.METHODS["sam"].defaults["rho"])
    )
    tx = optax.contrib.sam(harness.base_optimizer(), adversary, opaque_mode=True)
    return optax.with_extra_args_support(tx)


def _contrib_args(inputs: harness.StepInputs, axis_name: str | None) -> dict[str, Any]:
    def grad_fn(p, i):
        g = inputs.grad_fn(p)
        return g if axis_name is None else jax.lax.pmean(g, axis_name)

    return {"grad_fn": grad_fn}


DEFAULT_METHODS = ("sam", "contrib", "gsam", "looksam", "sam_every_k", "esam", "msam")


def contenders(methods: Sequence[str], devices: int = 1) -> list[Contender]:
    """ERM first, then ``methods`` (registry names, ``contrib`` for optax.contrib.sam).

    ESAM selects its examples on each of the ``devices`` under ``jax.jit`` (``groups``),
    as it does under ``shard_map`` and in the official code.
    """
    out = [_registry("sgd", "sgd (ERM)")]
    for name in methods:
        if name == "contrib":
            out.append(
                Contender("optax.contrib.sam (opaque)", "sam", _contrib_sam, None, local=True)
            )
        elif name == "sam_every_k":
            out.append(_registry(name, "sam every 5", k=5))
        elif name == "looksam":
            out.append(_registry(name, "looksam (k=5)", k=5))
        elif name == "esam":
            out.append(_registry(name, jit_overrides={"groups": devices}))
        elif name in registry.METHODS and name != "sgd":
            out.append(_registry(name))
        else:
            raise ValueError(
                f"--methods: unknown method {name!r}; choose from contrib, "
                f"{', '.join(sorted(registry.METHODS))} or all."
            )
    return out


# ------------------------------------------------------------------- steps, layouts


LAYOUTS = {
    "dp": "data parallel (params replicated)",
    "fsdp": "FSDP (params and state sharded)",
    "shard_map": "shard_map, per-device gradient (m-sharpness)",
}


def fsdp_spec(leaf: Any, devices: int) -> P:
    """Shards the largest dimension that divides by ``devices``; replicates the rest."""
    shape = np.shape(leaf)
    fits = [(size, axis) for axis, size in enumerate(shape) if size % devices == 0]
    if not fits:
        return P()
    axis = max(fits)[1]
    return P(*[None] * axis, AXIS)


def device_bytes(tree: PyTree, specs: PyTree, devices: int) -> int:
    """Bytes of ``tree`` on one device under ``specs`` (sharded leaves hold 1/devices)."""
    leaves, spec_leaves = jax.tree.leaves(tree), jax.tree.leaves(specs, is_leaf=_is_spec)
    return sum(
        math.prod(x.shape) * x.dtype.itemsize // (devices if AXIS in tuple(s) else 1)
        for x, s in zip(leaves, spec_leaves, strict=True)
    )


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def shard_map_step(
    model: harness.Model, tx: optax.GradientTransformation, contender: Contender, mesh
) -> Callable:
    """A step in which each device differentiates its own slice of the batch.

    ``check_vma=False``: the gradient of the local loss is the local gradient, as
    under ``pmap``; a method's gradient-shaped state is then per device.
    """

    def step(carry, batch):
        params, model_state, opt_state = carry

        def loss_fn(p):
            losses, new_state = model.per_example_loss(p, model_state, batch)
            return jnp.mean(losses), (losses, new_state)

        (loss, (losses, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        if not contender.local:
            grads = jax.lax.pmean(grads, AXIS)
        local_grad = jax.grad(lambda p: loss_fn(p)[0])
        inputs = harness.StepInputs(
            # A method without axis_name (bSAM, SAMPa) gets averaged gradients from it too.
            grad_fn=local_grad if contender.local else lambda p: jax.lax.pmean(local_grad(p), AXIS),
            per_example_loss_fn=lambda p, b: model.per_example_loss(p, model_state, b)[0],
            batch=batch,
            losses=losses,
        )
        updates, opt_state = tx.update(grads, opt_state, params, **_args(contender, inputs, AXIS))
        new_state = jax.lax.pmean(new_state, AXIS)
        carry = (optax.apply_updates(params, updates), new_state, opt_state)
        return carry, jax.lax.pmean(loss, AXIS)

    return jax.shard_map(
        step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()), check_vma=False
    )


def _args(contender: Contender, inputs: harness.StepInputs, axis_name: str | None) -> dict:
    if contender.update_args is None:  # optax.contrib.sam
        return _contrib_args(inputs, axis_name)
    return contender.update_args(inputs)


@dataclasses.dataclass
class Measured:
    """One contender's profile in one (model, layout), with what the table needs."""

    contender: Contender
    profile: StepProfile
    params_bytes: int


def prepare(
    model: harness.Model, layout: str, contender: Contender, mesh
) -> tuple[Callable, tuple, int]:
    """The jitted step of ``contender`` on ``model`` in ``layout``, its abstract inputs
    (``ShapeDtypeStruct`` with shardings) and the per-device params bytes."""
    devices = mesh.size
    tx = contender.make(AXIS if layout == "shard_map" else None)
    params, model_state = jax.eval_shape(model.init)
    carry = (params, model_state, jax.eval_shape(tx.init, params))
    batch = jax.eval_shape(lambda: model.make_batch(jax.random.key(0), model.batch_size))
    if layout == "fsdp":
        specs = jax.tree.map(lambda x: fsdp_spec(x, devices), carry)
    else:
        specs = jax.tree.map(lambda x: P(), carry)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), carry, shardings
    )
    data = NamedSharding(mesh, P(AXIS))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=data), batch)
    if layout == "shard_map":
        step = jax.jit(shard_map_step(model, tx, contender, mesh), donate_argnums=0)
    else:
        args = functools.partial(_args, contender, axis_name=None)
        step = jax.jit(
            harness.make_step(model, tx, args),
            out_shardings=(shardings, NamedSharding(mesh, P())),
            donate_argnums=0,
        )
    return step, (abstract, batch), device_bytes(params, specs[0], devices)


def measure(model: harness.Model, layout: str, contender: Contender, mesh) -> Measured:
    """Profiles ``contender``'s training step on ``model`` in ``layout`` (compile only)."""
    step, args, params_bytes = prepare(model, layout, contender, mesh)
    return Measured(contender, sam_optax.profile_step(step, *args), params_bytes)


# ---------------------------------------------------------------------------- tables

ESAM_NOTE = (
    "ESAM (gamma = 0.5) is not a two-gradient method: its selection runs a forward pass "
    "at w + e over the whole batch before the backward pass on the kept half (the clean "
    "per-example losses come from the first pass), so its FLOPs differ from 2x ERM by "
    "the method itself."
)
ESAM_AUTO_NOTE = (
    "Under jit ESAM is built with groups = the number of devices, so that each device "
    "selects among its own examples, as under shard_map (a selection over the global "
    "batch made XLA's partitioner replicate the kept examples on every device: 5.3x "
    "ERM's FLOPs per device on ViT-B/16 in data parallel)."
)
OWN_GRADIENTS_NOTE = (
    "SAMPa and bSAM take both their gradients from grad_fn and ignore the step's; the "
    "step still runs its forward pass for the loss it reports, so they cost two "
    "gradients and a forward pass, about 2.33x ERM (no FLOPs target)."
)


def _collective(profile: StepProfile, kind: str) -> str:
    stats = profile.collectives[kind]
    return "0" if stats.count == 0 else f"{stats.count} ({stats.bytes / MiB:.2f} MiB)"


def _failures(row: Measured, erm: Measured, sam: Measured | None) -> list[str] | None:
    """The targets ``row`` misses (``[]``: all met), or ``None`` where none applies."""
    method = registry.METHODS.get(row.contender.method)
    # bSAM and SAMPa ignore the step's gradient: the step's forward pass comes on top.
    two_grad = method is not None and method.grads_per_step.strip() == "2" and method.uses_gradient
    cond = row.contender.method in COND_METHODS
    p, e = row.profile, erm.profile
    checks: list[tuple[str, bool]] = []
    if two_grad and p.flops and e.flops:
        checks.append((f"FLOPs > {TWO_GRAD_FLOPS}x", p.flops <= TWO_GRAD_FLOPS * e.flops))
    if two_grad:
        checks.append(
            (
                f"compile > {TWO_GRAD_COMPILE}x",
                p.compile_cpu_s <= TWO_GRAD_COMPILE * e.compile_cpu_s,
            )
        )
    if cond:
        checks.append(
            (f"compile > {COND_COMPILE}x", p.compile_cpu_s <= COND_COMPILE * e.compile_cpu_s)
        )
        if sam is not None:
            checks.append(
                (
                    f"trace > {COND_TRACE}x SAM's",
                    p.trace_cpu_s <= COND_TRACE * sam.profile.trace_cpu_s,
                )
            )
    if row.contender.label == "sam":
        extra = (p.temp_bytes - e.temp_bytes) / row.params_bytes
        checks.append((f"extra temp > {SAM_EXTRA_TEMP}x params", extra <= SAM_EXTRA_TEMP))
        for kind in COLLECTIVES:
            n, n_erm = p.collectives[kind].count, e.collectives[kind].count
            checks.append(
                (f"{kind} {n} > 2x ERM + {SMALL_COLLECTIVES}", n <= 2 * n_erm + SMALL_COLLECTIVES)
            )
    if not checks:
        return None
    return [text for text, ok in checks if not ok]


def table(rows: list[Measured]) -> str:
    """The Markdown table of one (model, layout)."""
    erm = rows[0]
    sam = next((r for r in rows if r.contender.label == "sam"), None)
    e = erm.profile
    header = [
        "method",
        "FLOPs ×ERM",
        "temp MiB",
        "Δ temp ×params",
        "args MiB",
        "Δ args ×params",
        *COLLECTIVES,
        "trace ×ERM (CPU)",
        "lower ×ERM (CPU)",
        "compile ×ERM (CPU)",
        "targets",
    ]
    body = []
    for row in rows:
        p = row.profile
        failures = _failures(row, erm, sam)
        verdict = (
            "—" if failures is None else "pass" if not failures else "FAIL: " + "; ".join(failures)
        )
        flops = "—" if not (p.flops and e.flops) else f"{p.flops / e.flops:.3f}"
        body.append(
            [
                f"`{row.contender.label}`",
                flops,
                f"{p.temp_bytes / MiB:.1f}",
                f"{(p.temp_bytes - e.temp_bytes) / row.params_bytes:+.2f}",
                f"{p.argument_bytes / MiB:.1f}",
                f"{(p.argument_bytes - e.argument_bytes) / row.params_bytes:+.2f}",
                *(_collective(p, kind) for kind in COLLECTIVES),
                f"{p.trace_cpu_s / e.trace_cpu_s:.2f}",
                f"{p.lower_cpu_s / e.lower_cpu_s:.2f}",
                f"{p.compile_cpu_s / e.compile_cpu_s:.2f}",
                verdict,
            ]
        )
    return harness.markdown_table(header, body)


def notes(model: harness.Model, layout: str, rows: list[Measured], n_params: int) -> str:
    """The lines under a table: ERM's absolute figures and what the method itself explains."""
    e = rows[0].profile
    lines = [
        f"{model.title}: {n_params / 1e6:.1f} M parameters, global batch {model.batch_size}; "
        f"per-device params {rows[0].params_bytes / MiB:.1f} MiB. ERM: "
        f"{(e.flops or 0) / 1e9:.1f} GFLOP per device, temp {e.temp_bytes / MiB:.1f} MiB, "
        f"trace {e.trace_cpu_s:.2f} s, lower {e.lower_cpu_s:.2f} s, "
        f"compile {e.compile_cpu_s:.2f} s. Times are CPU seconds of the process, steadier "
        "than wall-clock time on a shared machine.",
    ]
    if any(r.contender.method in COND_METHODS for r in rows):
        lines.append(
            "A method that probes inside `lax.cond` shows the FLOPs of its probing step: "
            "XLA's cost analysis counts the more expensive branch of a conditional. On "
            "average such a step costs 1 + (probe fraction) gradients."
        )
    if any(r.contender.method == "esam" for r in rows):
        lines.append(ESAM_NOTE + ("" if layout == "shard_map" else " " + ESAM_AUTO_NOTE))
    if any(r.contender.method in ("sampa", "bsam") for r in rows):
        lines.append(OWN_GRADIENTS_NOTE)
    return " ".join(lines)  # one paragraph: its first sentence makes it unique


def run(
    quick: bool,
    model_keys: Sequence[str] = ("vit_b16", "gpt2", "resnet50"),
    layouts: Sequence[str] = tuple(LAYOUTS),
    methods: Sequence[str] = DEFAULT_METHODS,
    devices: Sequence[Any] | None = None,
) -> list[harness.Section]:
    """One section per (model, layout), compiled for ``devices`` (by default JAX's)."""
    devices = list(devices or jax.devices())
    mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
    every = models(quick, len(devices))
    sections = []
    for key in model_keys:
        model = every[key]
        n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(jax.eval_shape(model.init)[0]))
        warm_step, warm_args, _ = prepare(model, layouts[0], contenders([])[0], mesh)
        for layout in layouts:
            rows = []
            for contender in contenders(methods, len(devices)):
                # Every row is the first compile of its method in a process that has
                # traced the model: JAX's caches are cleared (what earlier rows cached,
                # such as the norm's per-shape trace), then ERM's step is traced and
                # lowered, so that the model's one-off costs (Flax's module setup,
                # JAX's caches of its primitives) are paid here, not in the row.
                jax.clear_caches()
                warm_step.trace(*warm_args).lower()
                harness.progress(f"scale: {key} {layout} {contender.label}")
                rows.append(measure(model, layout, contender, mesh))
                harness.progress(
                    f"  compile {rows[-1].profile.compile_cpu_s:.1f} s, "
                    f"trace {rows[-1].profile.trace_cpu_s:.2f} s"
                )
            body = f"{table(rows)}\n\n{notes(model, layout, rows, n_params)}"
            title = f"SAM at scale: {model.title}, {LAYOUTS[layout]}, {len(devices)} devices"
            section = harness.section(f"scale-{key}-{layout}", title, quick, body, devices)
            sections.append(section)
    return sections


def tpu_devices(topology: str) -> list[Any]:
    """The devices of a TPU ``topology`` (e.g. ``v5e:2x4``), for compiling with no chip.

    libtpu's compile-only client gives the devices of any topology on a host without
    TPUs; a program whose inputs are sharded over them is compiled by the TPU
    compiler, and :func:`sam_optax.profile_step` reads it as it reads a CPU one.
    """
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as error:  # no libtpu, or a topology libtpu does not know
        raise SystemExit(f"--tpu {topology!r}: no such TPU topology here ({error})") from None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models of the same kinds")
    parser.add_argument("--record", action="store_true", help="write the sections into README")
    parser.add_argument("--readme", default=harness.README, help="the file --record writes")
    parser.add_argument("--models", default="vit_b16,gpt2,resnet50")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument(
        "--tpu",
        metavar="TOPOLOGY",
        help="compile for a TPU topology with no chip attached (needs libtpu), e.g. v5e:2x4",
    )
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="registry names (and `contrib` for optax.contrib.sam), or `all`",
    )
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    if methods == ["all"]:
        methods = ["contrib", *(n for n in registry.METHODS if n != "sgd")]
    for name, chosen, allowed in (
        ("--models", args.models.split(","), ("vit_b16", "gpt2", "resnet50")),
        ("--layouts", args.layouts.split(","), tuple(LAYOUTS)),
    ):
        unknown = sorted(set(chosen) - set(allowed))
        if unknown:
            parser.error(f"{name}: unknown {unknown}; choose from {', '.join(allowed)}")
    devices = tpu_devices(args.tpu) if args.tpu else None
    sections = run(args.quick, args.models.split(","), args.layouts.split(","), methods, devices)
    for s in sections:
        print(s.markdown, flush=True)
    if args.record:
        harness.record(Path(args.readme), sections)
        print(f"recorded {', '.join(s.key for s in sections)} in {args.readme}")


if __name__ == "__main__":
    main()
