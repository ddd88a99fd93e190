"""sam_optax: every sharpness-aware minimization method as an optax transformation.

Chain a method in front of any optax optimizer and pass ``grad_fn`` to ``update``::

    tx = optax.chain(sam_optax.sam(rho=0.05), optax.sgd(0.1, momentum=0.9))
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
"""

from sam_optax import policies, sharpness
from sam_optax.centralization import (
    centralize,
    centralized_gradient,
    centralized_probe,
    kernel_axes,
)
from sam_optax.checkpoint import restore_checkpoint_state
from sam_optax.combines import (
    LookSAMState,
    gradient_norm_aware,
    interpolate,
    looksam_reuse,
    probe_gradient,
    surrogate_gap,
    weighted_sharpness,
)
from sam_optax.distributed import MSharpness, MSharpnessState, accumulate, m_sharpness
from sam_optax.methods.ae_sam import ae_looksam, ae_sam
from sam_optax.methods.bsam import BSAMState, bsam, bsam_sample
from sam_optax.methods.esam import esam
from sam_optax.methods.friendly_sam import friendly_sam
from sam_optax.methods.gam import gam
from sam_optax.methods.gcsam import gcsam
from sam_optax.methods.gsam import gsam, gsam_rho_schedule
from sam_optax.methods.lookbehind import LookbehindState, lookbehind_sam
from sam_optax.methods.looksam import looksam
from sam_optax.methods.mesa import (
    EMAState,
    MesaState,
    ema_params,
    ema_params_of,
    ema_update,
    mesa,
    mesa_loss,
    trajectory_kl,
)
from sam_optax.methods.msam import MSAMState, msam, msam_eval_params
from sam_optax.methods.rwp import rwp
from sam_optax.methods.sam import asam, fisher_sam, sam
from sam_optax.methods.sampa import SAMPaState, sampa
from sam_optax.methods.ssam import ssam
from sam_optax.methods.swa import SWAState, swa, swa_params, wasam
from sam_optax.methods.vasso import vasso
from sam_optax.methods.wsam import WSAMDecoupledState, wsam, wsam_decoupled
from sam_optax.pair import pair_grad_fn
from sam_optax.perturbations import (
    FilterwiseGaussianState,
    FriendlyState,
    StochasticPerturbationState,
    VaSSOState,
    adaptive_leaves,
    adaptive_perturbation,
    filterwise_gaussian,
    fisher_perturbation,
    friendly_perturbation,
    normalized_gradient,
    stochastic_weight_perturbation,
    vasso_perturbation,
)
from sam_optax.pieces import Combine, Context, Perturbation, Policy
from sam_optax.probes import sharpness_sensitive_data
from sam_optax.profile import CollectiveStats, StepProfile, profile_step
from sam_optax.skeleton import SharpnessAwareState, sharpness_aware
from sam_optax.sparse import (
    SparseMaskState,
    fisher_mask,
    set_sparse_mask,
    sparse_mask_perturbation,
)

__version__ = "0.1.0"

__all__ = [
    "BSAMState",
    "CollectiveStats",
    "Combine",
    "Context",
    "EMAState",
    "FilterwiseGaussianState",
    "FriendlyState",
    "LookSAMState",
    "LookbehindState",
    "MSAMState",
    "MSharpness",
    "MSharpnessState",
    "MesaState",
    "Perturbation",
    "Policy",
    "SAMPaState",
    "SWAState",
    "SharpnessAwareState",
    "SparseMaskState",
    "StepProfile",
    "StochasticPerturbationState",
    "VaSSOState",
    "WSAMDecoupledState",
    "accumulate",
    "adaptive_leaves",
    "adaptive_perturbation",
    "ae_looksam",
    "ae_sam",
    "asam",
    "bsam",
    "bsam_sample",
    "centralize",
    "centralized_gradient",
    "centralized_probe",
    "ema_params",
    "ema_params_of",
    "ema_update",
    "esam",
    "filterwise_gaussian",
    "fisher_mask",
    "fisher_perturbation",
    "fisher_sam",
    "friendly_perturbation",
    "friendly_sam",
    "gam",
    "gcsam",
    "gradient_norm_aware",
    "gsam",
    "gsam_rho_schedule",
    "interpolate",
    "kernel_axes",
    "lookbehind_sam",
    "looksam",
    "looksam_reuse",
    "m_sharpness",
    "mesa",
    "mesa_loss",
    "msam",
    "msam_eval_params",
    "normalized_gradient",
    "pair_grad_fn",
    "policies",
    "probe_gradient",
    "profile_step",
    "restore_checkpoint_state",
    "rwp",
    "sam",
    "sampa",
    "set_sparse_mask",
    "sharpness",
    "sharpness_aware",
    "sharpness_sensitive_data",
    "sparse_mask_perturbation",
    "ssam",
    "stochastic_weight_perturbation",
    "surrogate_gap",
    "swa",
    "swa_params",
    "trajectory_kl",
    "vasso",
    "vasso_perturbation",
    "wasam",
    "weighted_sharpness",
    "wsam",
    "wsam_decoupled",
]
