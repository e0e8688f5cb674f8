"""train.py's options: one table, from which its click options (training/cli/options.py), the keys of a run's
configuration (equal to the option names), what a resumed run may change and what defines the objective are
derived. Adding an option is one entry here; the component that reads it reads it by this name.

The recipes: the values of the options left unset (None), per network recipe (a network class declares its own,
`training.networks.base.Network.recipe`; a preset may change some, as EDM2's learning rate per size). EDM's
(Karras et al. 2022, CIFAR-10 32x32) for the ddpmpp / ncsnpp / adm networks: a constant learning rate after a
ramp-up, Adam beta2 0.999, an EMA with a half-life, augmentation. EDM2's (Karras et al. 2024, ImageNet-64
presets edm2-img64-*) for the edm2-* networks: learning rate lr / sqrt(max(t / lr_decay, 1)) after t training
steps, Adam beta2 0.99, the learned loss weighting of --precond=edm2, no augmentation, power-function EMAs
(--ema_std) and no classic EMA; the 32x32 runs keep the 64x64 values. A preset's dropout comes with the preset,
the sigma distribution (--P_mean, --P_std) with the loss (EDM's -1.2, 1.2; EDM2's -0.8, 1.6).
"""

from __future__ import annotations

from torch_utils.precision import PRECISIONS
from training import losses, metrics, networks, preconditioners, samplers
from training.options import Option, table

RECIPES: dict[str, dict] = {
    "edm": dict(precond="edm", lr=10e-4, lr_rampup=10.0, lr_decay=0.0, beta2=0.999, ema=0.5, ema_std="", dropout=0.13,
                augment=0.12),
    "edm2": dict(precond="edm2", lr=None, lr_rampup=10.0, lr_decay=35000.0, beta2=0.99, ema=0.0, ema_std="0.050,0.100",
                 dropout=None, augment=0.0),
}


def _solvers() -> list[str]:
    return list(samplers.SOLVERS)


def _objective(name: str, kind: str, help: str, **kwargs) -> Option:
    return Option(name, kind, help, objective=True, **kwargs)


def _pfgm(name: str, help: str, **kwargs) -> Option:
    return _objective(name, kwargs.pop("kind", "float"), f"PFGM: {help}", **kwargs)


def _fp(name: str, kind: str, help: str, **kwargs) -> Option:
    return _objective(name, kind, f"FP: {help}", needs="fp_reg", **kwargs)


_POSITIVE = dict(low=0, low_open=True)

OPTIONS: dict[str, Option] = table([
    # Where, and what data.
    Option("outdir", "dir", "Where to make the run directory", metavar="DIR", required=True, saved=False),
    Option("data", "str", "Training data: a ZIP or folder made by dataset_tool.py", metavar="ZIP|DIR", required=True,
           resume=True),
    Option("cond", "bool", "Train class-conditional", default=False),
    Option("xflip", "bool", "Enable dataset x-flips", default=False),
    Option("cache", "bool", "Cache decoded images in RAM", default=False, resume=True),
    Option("workers", "int", "DataLoader worker processes", default=1, low=0, resume=True),
    # The model.
    Option("arch", "choice", "Network: EDM's (recipe edm) or EDM2's sizes (recipe edm2: docs/edm2.md)",
           default="ddpmpp", choices=lambda: networks.presets()),
    Option("precond", "choice", "Preconditioning (pfgm: PFGM, D = 1) [default: edm; edm2-*: edm2]",
           choices=preconditioners.trainable),
    Option("loss", "choice", "Loss [default: the preconditioner's own]", choices=lambda: losses.LOSSES),
    Option("pfgmpp", "bool", "Train PFGM++ (needs --aug_dim)", default=False),
    Option("aug_dim", "D", "PFGM++ augmented dimension D > 0 ('inf' = diffusion)", needs="pfgmpp",
           why="the reference silently trains a diffusion model"),
    Option("cbase", "int", "Channel multiplier [default: preset]", low=1),
    Option("cres", "str", "Channels per resolution [default: preset]", metavar="LIST"),
    Option("nblock", "int", "Blocks per resolution [default: preset]", low=1),
    Option("attn", "str", "Attention resolutions [default: preset]", metavar="LIST"),
    Option("dropout", "float", "Dropout probability [default: 0.13; edm2-*: the preset's]", low=0, high=1, high_open=True),
    Option("label_dropout", "float", "Drop class labels with this probability (classifier-free guidance)", default=0.0,
           low=0, high=1, high_open=True, needs="cond", why="it drops class labels, which an unconditional run has none of"),
    Option("augment", "float", "Augment probability [default: 0.12; edm2-*: 0]", low=0, high=1),
    # The objective (read by one loss or another: training/losses).
    _objective("P_mean", "float", "Mean of ln sigma in training [default: -1.2; edm2: -0.8]"),
    _objective("P_std", "float", "Std of ln sigma in training [default: 1.2; edm2: 1.6]", **_POSITIVE),
    _objective("sigma_scale", "float", "Scale training sigma (LSUN 256^2 in PFGM++: 380/80 = 4.75)", default=1.0,
               **_POSITIVE),
    Option("lsun", "bool", "The PFGM++ reference's LSUN 256x256 setting: --sigma_scale=4.75 (380/80)", default=False,
           saved=False),
    _objective("stf", "bool", "Stable target field", default=False),
    Option("rbatch", "int", "Reference batch of --stf and --precond=pfgm", default=4096, low=1),
    _pfgm("pfgm_M", "perturbation range m in (0, M) [default: derived from the data]", **_POSITIVE),
    _pfgm("tau", "growth of the perturbation per unit of m  [default: 0.03]", **_POSITIVE),
    _pfgm("gamma", "field normalisation E/(|E|+gamma)  [default: 5]", low=0),
    _pfgm("sigma_end", "smallest perturbation scale  [default: 0.01]", **_POSITIVE),
    _pfgm("z_max", "starting z of sampling [default: derived from the data]", **_POSITIVE),
    _pfgm("z_min", "final z of sampling  [default: 0.001]", **_POSITIVE),
    _pfgm("upper_norm", "the prior's norm is clipped here [default: derived from the data]", **_POSITIVE),
    _pfgm("z_exp", "below this z, v_z is derived from |v_x|  [default: 5]", low=0),
    _pfgm("restrict_M", "m < 0.7 M for small z draws  [default: 1]", kind="bool"),
    _objective("fp_reg", "bool", "FP-Diffusion score Fokker-Planck regulariser (docs/likelihood.md)", default=False),
    _fp("fp_alpha", "float", "weight of the vector (score FPE) residual", default=0.15, low=0),
    _fp("fp_beta", "float", "weight of the scalar (log-density FPE) residual", default=0.01, low=0),
    _fp("fp_order", "float", "order m of the residual norms", default=2.0, **_POSITIVE),
    _fp("fp_weighting", "choice", "time weighting g^2 (ll), g (convention) or 1", default="ll",
        choices=("ll", "convention", "constant")),
    _fp("fp_probe", "choice", "Hutchinson probes of the divergence", default="rademacher",
        choices=("rademacher", "gaussian")),
    _fp("fp_probes", "int", "probes per sample", default=1, low=1),
    _fp("fp_step", "float", "finite-difference step in ln(sigma)", default=1e-2, **_POSITIVE),
    # The optimisation.
    Option("duration", "float", "Training duration", metavar="MIMG", default=200.0, resume=True, **_POSITIVE),
    Option("batch", "int", "Total batch size", default=512, low=1),
    Option("batch_gpu", "int", "Limit batch size per GPU (accumulate)", aliases=("--batch-gpu",), low=1, resume=True),
    Option("lr", "float", "Learning rate (edm2: before the decay) [default: 10e-4; edm2-*: EDM2's per size]",
           **_POSITIVE),
    Option("lr_rampup", "float", "Learning-rate ramp-up [default: 10]", metavar="MIMG", low=0),
    Option("lr_decay", "float", "EDM2's decay lr/sqrt(t/t_ref) after t_ref steps; 0: none [default: 0; edm2-*: 35000]",
           metavar="BATCHES", low=0),
    Option("beta2", "float", "Adam beta2 [default: 0.999; edm2-*: 0.99]", low=0, high=1, high_open=True),
    Option("ema", "float", "EMA half-life; 0: none [default: 0.5; edm2-*: 0]", metavar="MIMG", low=0),
    Option("ema_std", "str", "Power-function EMAs to track, by sigma_rel (docs/phema.md); none: off [default: none; "
           "edm2-*: 0.050,0.100]", metavar="LIST"),
    Option("ls", "float", "Loss scaling", default=1.0, **_POSITIVE),
    Option("seed", "int", "Random seed", default=0, low=0),
    Option("transfer", "str", "Initialise from a network snapshot", metavar="PKL|PT|URL", resume=True),
    # How it computes.
    Option("precision", "choice", "Arithmetic", default="tf32", choices=PRECISIONS, resume=True),
    Option("fp16", "bool", "EDM's fp16 network mode (same as --precision=fp16)", default=False, resume=True),
    Option("compile", "bool", "torch.compile the network", default=False, resume=True),
    Option("channels_last", "bool", "channels_last memory format", default=False, resume=True),
    Option("bench", "bool", "cuDNN benchmarking (on CUDA)", default=True, resume=True),
    Option("dist_timeout", "float", "Seconds a collective waits for the other ranks before failing", metavar="SEC",
           default=600.0, low=1, resume=True),
    # What it reports and writes, and when.
    Option("desc", "str", "String to add to the run directory name", metavar="STR", saved=False),
    Option("name", "str", "The run directory is --outdir/NAME, no number (the PFGM++ reference's --name)", metavar="NAME",
           saved=False),
    Option("nosubdir", "flag", "Use --outdir itself as the run directory", default=False, saved=False),
    Option("tick", "float", "How often to print progress", metavar="KIMG", default=50.0, resume=True, **_POSITIVE),
    Option("snap", "int", "How often to save snapshots", metavar="TICKS", default=50, low=1, resume=True),
    Option("dump", "int", "How often to dump training state", metavar="TICKS", default=500, low=1, resume=True),
    Option("grid", "int", "Samples in the grid at each snapshot (0: none)", default=64, low=0, resume=True),
    Option("wandb", "str", "Also log each tick to Weights & Biases, in this project (pip install wandb; "
           "WANDB_MODE=offline logs without a network)", metavar="PROJECT", resume=True),
    Option("metrics", "str", "Evaluate each snapshot's networks: " + ", ".join(metrics.METRICS) +
           " (comma-separated) [default: none]", metavar="LIST", resume=True),
    Option("metrics_ref", "str", "Reference statistics of --metrics (npz path or URL), or a dataset folder/ZIP",
           metavar="NPZ|URL|DIR", needs="metrics", resume=True),
    Option("metrics_num", "int", "Images per evaluation of --metrics (seeds 0 to N-1)", default=50000, low=2,
           needs="metrics", resume=True),
    Option("detector", "str", "Detector of --metrics [default: $PFGMPP_DETECTOR, else the Inception-v3 URL]",
           metavar="PATH|URL", needs="metrics", resume=True),
    Option("metrics_solver", "choice", "Sampler of --metrics [default: heun]", choices=_solvers, needs="metrics",
           resume=True),
    Option("metrics_steps", "int", "Noise levels of --metrics' sampler [default: the solver's]", low=1,
           needs="metrics", resume=True),
    Option("metrics_alpha", "float", "--metrics with the robustness study's injected noise (--perturb_alpha of "
           "generate.py) [default: 0]", low=0, needs="metrics", resume=True),
    Option("metrics_bits", "int", "--metrics of the networks with weights quantised to B bits (--quantize_bits of "
           "generate.py) [default: full precision]", metavar="B", low=1, high=32, needs="metrics", resume=True),
    Option("resume", "str", "Resume: 'auto' (newest state of this run) or a training-state file", metavar="auto|PT",
           saved=False),
    Option("dry_run", "flag", "Print the configuration and exit", default=False, aliases=("-n", "--dry-run"),
           saved=False),
])  # fmt: skip


def saved() -> list[str]:
    """The names of the options a run's configuration holds."""
    return [name for name, option in OPTIONS.items() if option.saved]


def resumable() -> list[str]:
    """The names of the options a resumed run may change."""
    return [name for name, option in OPTIONS.items() if option.saved and option.resume]


def objective() -> list[str]:
    """The names of the options of one loss or another (`training.losses`: each declares those it reads)."""
    return [name for name, option in OPTIONS.items() if option.objective]
