"""The method registry: every method of the library by name, with its paper defaults.

The comparison command, the benchmarks and the tests build optimizers from here,
so a new method becomes available everywhere by one :class:`Method` entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import optax

from sam_optax import _validate, policies
from sam_optax._state import find_state
from sam_optax.methods.ae_sam import ae_looksam, ae_sam
from sam_optax.methods.bsam import bsam
from sam_optax.methods.esam import esam
from sam_optax.methods.friendly_sam import friendly_sam
from sam_optax.methods.gam import gam
from sam_optax.methods.gcsam import gcsam
from sam_optax.methods.gsam import gsam
from sam_optax.methods.lookbehind import lookbehind_sam
from sam_optax.methods.looksam import looksam
from sam_optax.methods.mesa import ema_params_of, mesa, mesa_loss
from sam_optax.methods.msam import msam, msam_eval_params
from sam_optax.methods.rwp import rwp
from sam_optax.methods.sam import asam, fisher_sam, sam
from sam_optax.methods.sampa import previous_batch_oracle, sampa
from sam_optax.methods.ssam import ssam
from sam_optax.methods.swa import SWAState, swa, wasam
from sam_optax.methods.vasso import vasso
from sam_optax.methods.wsam import wsam, wsam_decoupled


@dataclasses.dataclass(frozen=True)
class Method:
    """One named method.

    Attributes:
      name: the name used on the command line (``sam``, ``looksam``, ...).
      constructor: the public constructor, or ``None`` for ``sgd`` (no
        sharpness-aware transformation).
      defaults: the paper defaults passed to ``constructor``.
      paper: ``Author et al., venue year``.
      grads_per_step: the expected gradient evaluations per step, as a string
        for tables (``"2"``, ``"1 + 1/k"``); the comparison command measures it.
      build: ``(constructor_kwargs, base, setup) -> tx`` for methods that are not
        simply chained in front of the base optimizer (a wrapper such as
        decoupled WSAM, or a complete optimizer such as MSAM). ``setup`` holds
        ``learning_rate`` (a schedule), ``total_steps``, ``num_data`` (the size
        of the training set) and ``batch_like`` (the shapes and dtypes of one
        batch), each ``None`` when the caller does not give it.
      eval_params: ``(params, opt_state) -> params`` to evaluate, for methods
        whose evaluation weights are not the training params (SWA's average,
        MSAM's unperturbed weights); ``None``: the params themselves.
      recompute_batch_stats: whether BatchNorm statistics must be recomputed
        for the evaluation weights (``sam_optax.flax.recompute_batch_stats_*``).
      family: the methods page it belongs to, a key of :data:`FAMILIES`.
      uses_gradient: ``False`` for a method that ignores its incoming gradient
        and evaluates every gradient it uses itself (bSAM, SAMPa): the
        comparison then runs the clean pass forward only
        (``sam_optax.flax.linen_step(..., clean_gradient=False)``).
      loss_term: ``(opt_state, apply, x, logits) -> scalar``, a term that the
        training loop adds to the loss it differentiates (MESA's trajectory
        loss), where ``apply(params, x) -> logits`` runs the model in eval mode
        and ``opt_state`` is the state before the step; ``None``: none.
      base_steps: ``hyperparameters -> n`` for a method that steps the base
        optimizer ``n`` times per training step (Lookbehind-SAM: ``k``); the
        comparison then builds the base's learning-rate schedule over ``n``
        times the training steps, so that it decays over training. ``None``: 1.
      paper_values: the papers' values of hyperparameters that only the registry
        has (no constructor default to read them from), where they differ from
        ``defaults`` (bSAM's learning rate ``alpha``).
    """

    name: str
    constructor: Callable[..., optax.GradientTransformation] | None
    defaults: Mapping[str, Any]
    paper: str
    grads_per_step: str
    build: Callable[[dict[str, Any], optax.GradientTransformation, dict[str, Any]], Any] | None = (
        None
    )
    eval_params: Callable[[Any, Any], Any] | None = None
    recompute_batch_stats: bool = False
    family: str = "core"
    uses_gradient: bool = True
    loss_term: Callable[[Any, Callable[[Any, Any], Any], Any, Any], Any] | None = None
    base_steps: Callable[[Mapping[str, Any]], int] | None = None
    paper_values: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# family -> (title, docs page under docs/methods/).
FAMILIES: dict[str, tuple[str, str]] = {
    "base": ("the base optimizer", ""),
    "core": ("the core family", "core.md"),
    "geometry": ("geometry", "geometry.md"),
    "efficient": ("efficient", "efficient.md"),
    "averaging": ("averaging", "averaging.md"),
    "parallel": ("two gradients at once", "parallel.md"),
    "bayesian": ("Bayesian", "bayesian.md"),
    "multistep": ("more probes per step", "multistep.md"),
}


def _averaging_start(kwargs: dict[str, Any], setup: dict[str, Any]) -> dict[str, Any]:
    """Turns the registry's ``start_fraction`` into SWA's (or MESA's) ``start_step``.

    An explicit ``start_step`` override wins; otherwise averaging (MESA: the
    trajectory loss) starts at ``int(start_fraction * total_steps)`` (SWA's
    default 75 % of training, inside the 50-90 % of Kaddour et al.). SWA's default
    ``every=1`` averages every step; the paper's once-per-epoch protocol is
    ``every=steps_per_epoch``.
    """
    kwargs = dict(kwargs)
    fraction = kwargs.pop("start_fraction")
    _validate.in_range("start_fraction", fraction, 0.0, 1.0)
    if "start_step" not in kwargs:
        if setup["total_steps"] is None:
            raise ValueError(
                "SWA, WASAM and MESA need `total_steps` (or an explicit `start_step`)."
            )
        kwargs["start_step"] = int(fraction * setup["total_steps"])
    return kwargs


def _build_swa(kwargs: dict[str, Any], base: optax.GradientTransformation, setup: dict[str, Any]):
    return optax.chain(base, swa(**_averaging_start(kwargs, setup)))


def _build_wasam(kwargs: dict[str, Any], base: optax.GradientTransformation, setup: dict[str, Any]):
    return wasam(base, **_averaging_start(kwargs, setup))


def _swa_eval_params(params: Any, opt_state: Any) -> Any:
    """The SWA average, or the params themselves before averaging has started."""
    state = find_state(opt_state, SWAState, "registry")
    return params if int(state.averaged) == 0 else state.mean


def _build_mesa(kwargs: dict[str, Any], base: optax.GradientTransformation, setup: dict[str, Any]):
    return mesa(base, **_averaging_start(kwargs, setup))


def _mesa_loss_term(opt_state: Any, apply: Callable[[Any, Any], Any], x: Any, logits: Any) -> Any:
    """MESA's trajectory loss against the EMA teacher's logits (one forward pass, no gradient)."""
    return mesa_loss(opt_state, logits, apply(ema_params_of(opt_state), x))


def _build_msam(kwargs: dict[str, Any], base: optax.GradientTransformation, setup: dict[str, Any]):
    """MSAM replaces the base optimizer: SGD with momentum at the run's learning rate."""
    del base
    if setup["learning_rate"] is None:
        raise ValueError("MSAM is a complete optimizer: it needs `learning_rate`.")
    return msam(setup["learning_rate"], **kwargs)


def _build_sampa(kwargs: dict[str, Any], base: optax.GradientTransformation, setup: dict[str, Any]):
    """SAMPa wraps the base optimizer. Lagged (the official code) where the batch's shapes
    are known: a small state keeps the last batch, and the pair oracle is built from the
    extra arguments ``per_example_loss_fn`` and ``batch``. Without ``batch_like``, or with
    ``same_batch=True``, both gradients are taken on the current batch through ``grad_fn``.
    """
    if kwargs.get("same_batch") or setup["batch_like"] is None:
        return sampa(base, **{**kwargs, "same_batch": True})
    return previous_batch_oracle(sampa(base, **kwargs), setup["batch_like"])


def _build_bsam(kwargs: dict[str, Any], base: optax.GradientTransformation, setup: dict[str, Any]):
    """bSAM replaces the base optimizer: its own ``alpha``, decayed as the comparison's base.

    ``alpha`` follows a cosine decay to 0 over ``total_steps`` (constant when that
    is not given); ``num_data`` is the training set's size.
    """
    del base
    if setup["num_data"] is None:
        raise ValueError("bSAM needs `num_data`, the size of the training set (its noise scale).")
    kwargs = dict(kwargs)
    alpha = kwargs.pop("alpha")
    _validate.non_negative("alpha", alpha)
    steps = setup["total_steps"]
    schedule = alpha if steps is None else optax.cosine_decay_schedule(alpha, steps)
    return bsam(schedule, setup["num_data"], **kwargs)


def _needs_total_steps(constructor: Callable[..., optax.GradientTransformation]) -> Callable:
    """A ``build`` for methods whose constructor needs the length of training."""

    def build(kwargs, base, setup):
        return optax.chain(constructor(total_steps=setup["total_steps"], **kwargs), base)

    return build


def _sam_with(policy: Callable[..., Any], arg: str) -> Callable:
    """A ``build`` for SAM under a switching policy whose parameter ``arg`` is a hyperparameter."""

    def build(kwargs, base, setup):
        del setup
        kwargs = dict(kwargs)
        return optax.chain(sam(policy=policy(kwargs.pop(arg)), **kwargs), base)

    return build


def _ssam(mode: str) -> Callable:
    """A ``build`` for Sparse SAM in ``mode`` (SSAM-D also takes the length of training)."""

    def build(kwargs, base, setup):
        steps = {"total_steps": setup["total_steps"]} if mode == "dynamic" else {}
        return optax.chain(ssam(mode=mode, **steps, **kwargs), base)

    return build


# Registry defaults are the papers' (the constructors' own defaults), except where the
# recorded sweeps (benchmarks/SWEEPS.md: MNIST-1D, clean and 40 % noisy labels, 3 seeds)
# show the paper's value training worse than SGD in our setting; each such entry says
# why, and so do the method's docstring and docs page.
METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("sgd", None, {}, "the base optimizer alone", "1", family="base"),
        Method("sam", sam, {"rho": 0.05}, "Foret et al., ICLR 2021", "2"),
        # rho 0.2, not the paper's 0.5 (CIFAR): 0.5 ties SGD on clean MNIST-1D (6 seeds:
        # 92.9 % against 93.0 %), 0.2 gains (93.5 %); with noisy labels 0.5 is better.
        Method("asam", asam, {"rho": 0.2, "eta": 0.01}, "Kwon et al., ICML 2021", "2"),
        Method("fisher_sam", fisher_sam, {"rho": 0.1, "eta": 1.0}, "Kim et al., ICML 2022", "2"),
        Method(
            "gsam",
            gsam,
            {"rho": 0.05, "alpha": 0.4},
            "Zhuang et al., ICLR 2022",
            "2",
            family="geometry",
        ),
        # The paper's own mode: the sharpness term bypasses the base optimizer.
        Method(
            "wsam",
            wsam_decoupled,
            {"rho": 0.05, "gamma": 0.9},
            "Yue et al., KDD 2023",
            "2",
            build=lambda kw, base, setup: wsam_decoupled(base, setup["learning_rate"], **kw),
            family="geometry",
        ),
        # gamma 0.7, not 0.9: coupled, the base optimizer's momentum also integrates the
        # sharpness term gamma / (1 - gamma) (g_p - g), nine times SAM's at 0.9, and
        # training collapses (sweep: 27.7 % clean, 10.1 % noisy; 0.7: 93.9 %, 70.8 %).
        Method(
            "wsam_coupled",
            wsam,
            {"rho": 0.05, "gamma": 0.7},
            "Yue et al., KDD 2023",
            "2",
            family="geometry",
        ),
        Method(
            "vasso",
            vasso,
            {"rho": 0.05, "theta": 0.9},
            "Li & Giannakis, NeurIPS 2023",
            "2",
            family="geometry",
        ),
        Method(
            "friendly_sam",
            friendly_sam,
            {"rho": 0.05, "sigma": 1.0, "lmbda": 0.9},
            "Li et al., CVPR 2024",
            "2",
            family="geometry",
        ),
        # rho 0.2, not 0.05: with its descent centralised, GCSAM at 0.05 trains below SGD
        # (sweep: 92.1 % clean, 59.7 % noisy; SGD 93.3 %, 60.5 %); 0.2 gains (93.8 %, 69.8 %).
        Method(
            "gcsam",
            gcsam,
            {"rho": 0.2},
            "Hassan et al., IEEE Access 2025",
            "2",
            family="geometry",
        ),
        # update_every 156 steps: the official 5 epochs (update_freq), in MNIST-1D epochs
        # of 4000 / 128 = 31 steps; num_samples 1024 uses the whole batch of 128.
        Method(
            "ssam_f",
            ssam,
            {"rho": 0.05, "sparsity": 0.2, "update_every": 156, "num_samples": 1024},
            "Mi et al., NeurIPS 2022",
            "2 + min(num_samples, B) / (B · update_every)",
            build=_ssam("fisher"),
            family="geometry",
        ),
        Method(
            "ssam_d",
            ssam,
            {"rho": 0.05, "sparsity": 0.2, "update_every": 156, "drop_rate": 0.5},
            "Mi et al., NeurIPS 2022",
            "2",
            build=_ssam("dynamic"),
            family="geometry",
        ),
        # alpha 0.1, not 0.7 (tuned for ViTs with LAMB/Adam): with SGD momentum the
        # reused direction, fixed for k - 1 steps, builds up in the momentum buffer
        # (sweep: 79.7 % clean at 0.7, 93.9 % at 0.1; SGD 93.3 %).
        Method(
            "looksam",
            looksam,
            {"rho": 0.1, "k": 5, "alpha": 0.1},
            "Liu et al., CVPR 2022",
            "1 + 1/k",
            family="efficient",
        ),
        Method(
            "ae_sam",
            ae_sam,
            {"rho": 0.05, "delta": 0.9, "lambda1": -1.0, "lambda2": 1.0},
            "Jiang et al., ICLR 2023",
            "1 + probe fraction",
            build=_needs_total_steps(ae_sam),
            family="efficient",
        ),
        # alpha 0.2, for LookSAM's reason (sweep: 83.4 % clean at 0.7). Smaller alphas
        # gain more with clean labels and less with noisy ones (6 seeds clean: 93.4 % at
        # 0.2, 93.0 % at 0.1, SGD 93.0 %; 3 seeds noisy: 73.0 % at 0.3, 68.1 % at 0.1).
        Method(
            "ae_looksam",
            ae_looksam,
            {"rho": 0.1, "alpha": 0.2, "delta": 0.9, "lambda1": -1.0, "lambda2": 1.0},
            "Jiang et al., ICLR 2023",
            "1 + probe fraction",
            build=_needs_total_steps(ae_looksam),
            family="efficient",
        ),
        Method(
            "esam",
            esam,
            {"rho": 0.05, "beta": 0.6, "gamma": 0.5},
            "Du et al., ICLR 2022",
            "1 + gamma (backward) + 2 forwards",
            family="efficient",
        ),
        # k 2 (probe on every other step): at k 5, 93.0 % clean against SGD's 93.3 %; at
        # k 2, 93.4 % clean and 65.1 % with noisy labels (SGD 60.5 %), at the expected cost
        # of `rst` at p 0.5, so the two switching baselines are compared at equal cost.
        Method(
            "sam_every_k",
            sam,
            {"rho": 0.05, "k": 2},
            "MosaicML Composer (SAM interval)",
            "1 + 1/k",
            build=_sam_with(policies.every, "k"),
            family="efficient",
        ),
        Method(
            "rst",
            sam,
            {"rho": 0.05, "p": 0.5},
            "Zhao et al., arXiv 2022",
            "1 + p",
            build=_sam_with(policies.bernoulli, "p"),
            family="efficient",
        ),
        # decay 0.98, not 0.9998: 0.9998 averages over 5,000 steps, 4.4 % of the paper's
        # ImageNet run; over our 1,000 steps the teacher would stay near the initial
        # weights (89.8 % clean; SGD 93.3 %). 0.98 keeps the paper's horizon as a fraction
        # of training (50 steps) and measures 93.3 % clean, 65.6 % noisy (SGD 60.5 %).
        # start_fraction 0.067: the official kl_start 5 of 90 epochs, strict (6 / 90).
        Method(
            "mesa",
            mesa,
            {"weight": 0.8, "temperature": 5.0, "decay": 0.98, "start_fraction": 0.067},
            "Du et al., NeurIPS 2022",
            "1 (+ 1 forward)",
            build=_build_mesa,
            loss_term=_mesa_loss_term,
            family="efficient",
        ),
        Method(
            "swa",
            swa,
            {"start_fraction": 0.75, "every": 1},
            "Izmailov et al., UAI 2018",
            "1",
            build=_build_swa,
            eval_params=_swa_eval_params,
            recompute_batch_stats=True,
            family="averaging",
        ),
        Method(
            "wasam",
            wasam,
            {"rho": 0.05, "start_fraction": 0.75, "every": 1},
            "Kaddour et al., NeurIPS 2022",
            "2",
            build=_build_wasam,
            eval_params=_swa_eval_params,
            recompute_batch_stats=True,
            family="averaging",
        ),
        Method(
            "msam",
            msam,
            # rho 1. The paper's rho = 3 belongs to its WRN and ResNet scripts (lr 0.5);
            # here it sends training to chance level (sweep: 10.2 % clean). The official
            # class default 0.3 only ties SGD (93.2 % clean, 61.1 % with noisy labels);
            # rho 1 gains (93.9 %, 70.8 %; SGD 93.3 %, 60.5 %).
            {"rho": 1.0, "momentum": 0.9},
            "Becker et al., arXiv 2024",
            "1",
            build=_build_msam,
            eval_params=msam_eval_params,
            family="averaging",
        ),
        # The official code's lagged form: the gradient at x̃ on the previous batch. The
        # official defaults beat SGD (MNIST-1D, 3 seeds: 93.8 % clean, 66.7 % noisy).
        # Without `batch_like` the build falls back to the same-batch form.
        Method(
            "sampa",
            sampa,
            {"rho": 0.1, "lam": 0.2, "same_batch": False},
            "Xie et al., NeurIPS 2024",
            "2 (1 on two device groups)",
            build=_build_sampa,
            family="parallel",
            uses_gradient=False,
        ),
        # Both gradients on the same batch (the official code splits the data); the
        # official CIFAR defaults (93.4 % clean, 64.5 % noisy; SGD 93.3 %, 60.5 %).
        Method(
            "rwp",
            rwp,
            {"rho": 0.01, "lam": 0.5},
            "Li et al., arXiv 2022",
            "2 (1 on two device groups)",
            family="parallel",
        ),
        # A complete optimizer with its own learning rate alpha (divided by its precision
        # s, which starts at 1), cosine-decayed over the run; N is the training set's size.
        # alpha 2, not the paper's 0.5: on a 1000-step MNIST-1D run 0.5 underfits (sweep,
        # 3 seeds: 91.2 % clean, train loss 0.036, and 62.0 % with noisy labels, against
        # SGD's 93.3 %, 0.013 and 60.5 %), 1 gains little (93.8 %, 64.2 %), 2 gains most
        # (95.2 %, 65.7 %). rho 0.01 and the constructor's delta 2e-4 are the paper's
        # CIFAR-10 values (rho 0.1 does better with noisy labels, 71.3 %, 94.2 % clean).
        Method(
            "bsam",
            bsam,
            {"alpha": 2.0, "rho": 0.01},
            "Möllenhoff & Khan, ICLR 2023",
            "2",
            build=_build_bsam,
            family="bayesian",
            uses_gradient=False,
            paper_values={"alpha": 0.5},
        ),
        # The official code's CIFAR-10 ResNet setting (main_cifar.py); MNIST-1D, 3 seeds:
        # 94.1 % clean, 70.6 % noisy (SGD 93.3 %, 60.5 %).
        Method(
            "gam",
            gam,
            {"rho": 0.2, "rho_prime": 0.03, "alpha": 0.1, "beta": 0.1, "gamma": 0.05},
            "Zhang et al., CVPR 2023",
            "4",
            family="multistep",
        ),
        # The official README's SAM setting: k 2, adaptive alpha (the constructor's None);
        # 93.8 % clean, 72.0 % noisy. k 3 and 5 diverge at SGD's lr 0.1 (22.9 %, 9.8 %).
        Method(
            "lookbehind_sam",
            lookbehind_sam,
            {"rho": 0.05, "k": 2},
            "Mordido et al., ICML 2024",
            "k + 1",
            build=lambda kw, base, setup: lookbehind_sam(base, **kw),
            family="multistep",
            base_steps=lambda kw: kw["k"],
        ),
    ]
}


def make_optimizer(
    name: str,
    base: optax.GradientTransformation,
    *,
    learning_rate: optax.ScalarOrSchedule | None = None,
    total_steps: int | None = None,
    batch_like: Any = None,
    num_data: int | None = None,
    **overrides: Any,
) -> optax.GradientTransformation:
    """Builds the full optimizer of a registered method in front of ``base``.

    Args:
      name: a key of :data:`METHODS`.
      base: the base optimizer (``sgd`` returns it unchanged).
      learning_rate: the base optimizer's learning rate (number or schedule),
        for methods that need it (decoupled WSAM, MSAM).
      total_steps: the length of training, for methods that need it (AE-SAM).
      batch_like: one batch, or its ``jax.ShapeDtypeStruct`` pytree, for methods
        that keep the previous batch in their state (lagged SAMPa; without it,
        SAMPa takes both gradients on the current batch).
      num_data: the size of the training set, for methods that need it (bSAM).
      **overrides: hyperparameters that replace the method's defaults.

    Returns:
      An optax transformation whose ``update`` takes ``grad_fn`` (ignored by
      ``sgd``).

    Examples:
      >>> import optax
      >>> from sam_optax import registry
      >>> tx = registry.make_optimizer("sam", optax.sgd(0.1), rho=0.1)
      >>> {"asam", "fisher_sam", "sam", "sgd"} <= set(registry.METHODS)
      True
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    method = METHODS[name]
    if method.constructor is None:
        if overrides:
            raise ValueError(f"`sgd` takes no hyperparameters, got {sorted(overrides)}")
        return optax.with_extra_args_support(base)
    kwargs = {**method.defaults, **overrides}
    if method.build is not None:
        setup = {
            "learning_rate": learning_rate,
            "total_steps": total_steps,
            "num_data": num_data,
            "batch_like": batch_like,
        }
        return method.build(kwargs, base, setup)
    return optax.chain(method.constructor(**kwargs), base)
