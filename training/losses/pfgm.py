"""PFGM's objective (Xu et al. 2022), the D = 1 member of PFGM++: field target, perturbation, loss, hyper-parameters.

Data y in R^N sit at z = 0 of R^(N+1). For a set {y_i} the empirical Poisson field at x~ = (x, z), with the
coefficients normalised to sum to 1 (PFGM's c(x~)), is

    E(x~) = sum_i w_i (y~_i - x~),   w_i proportional to |x~ - y~_i|^-(N+1),

and the training target is v = sqrt(N + 1) E / (|E| + gamma), as specified for this project (PFGM's
reference code scales by sqrt(N); the two differ by a factor 1 + O(1/N), which the ODE, a function of
v_x / v_z only, does not see). Since every y~_i has z = 0, E = (E[y|x] - x, -z) exactly, where E[y|x] is
the PFGM++ posterior mean at D = 1 with r = z: `training.pfgmpp.posterior_mean` (chunked, float64) is the
one implementation of both. The network predicts the field (`training.preconditioners.pfgm.PFGMPrecond`,
its 'field' output), which the same identity turns into a denoiser for every sampler.

The loss owns its training options (train.py --precond=pfgm: --pfgm_M, --tau, --gamma, --sigma_end, --z_max,
--z_min, --upper_norm, --z_exp, --restrict_M) and derives M, z_max and upper_norm from the data where they are
unset, with PFGM's helper (`derive_hparams`, also `pfgmpp-pfgm-hparams`, training/cli/pfgm_hparams.py):

    pfgmpp-pfgm-hparams --data_norm=32 --resolution=32     # CIFAR-10: M = 291
"""

from __future__ import annotations

import math

import torch

from torch_utils import rng
from training import pfgmpp
from training.losses.base import Loss

# The reference code restricts m to [0, 0.7 M) where its Gaussian draw of z is below 0.005 (App. B.1.1).
_RESTRICT_Z, _RESTRICT_FRACTION = 0.005, 0.7
_Z_FLOOR = 1e-10  # as the reference clamps z: ln z stays finite for the network


def normalized_field(x: torch.Tensor, z, data: torch.Tensor, gamma: float = 5.0,
                     chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """PFGM's target sqrt(N + 1) E / (|E| + gamma) at (x, z) for the set `data`: (v_x like x, v_z [B]), float64.

    Memory is bounded by `chunk` data points at a time (B * chunk distances); z is a scalar or [B].
    """
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError("x must be a batched tensor [B, ...]")
    batch, N = x.shape[0], math.prod(x.shape[1:])
    x64 = x.to(torch.float64)
    z = torch.as_tensor(z, dtype=torch.float64, device=x.device).reshape(-1).expand(batch)
    E_x = pfgmpp.posterior_mean(x64, z, 1, data, chunk=chunk) - x64  # E[y|x] at D = 1, r = z
    E_z = -z
    norm = (E_x.flatten(1).square().sum(dim=1) + E_z.square()).sqrt()
    scale = math.sqrt(N + 1) / (norm + gamma)  # the field lives in N + 1 dimensions
    return E_x * scale.reshape(-1, *([1] * (x.ndim - 1))), E_z * scale


def perturb(shape, M: float, tau: float = 0.03, sigma_end: float = 0.01, restrict_M: bool = True,
            generator: rng.Generators = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """PFGM's perturbation (Alg. 2): (z [B], n [B, ...]) with m ~ U(0, M), z = |eps_z| (1 + tau)^m, n = eps_x (1 + tau)^m.

    eps_z ~ N(0, sigma_end^2) and eps_x ~ N(0, sigma_end^2 I): the reference draws |eps_x| and a uniform
    direction separately, which is the same distribution. With `restrict_M`, m ~ U(0, int(0.7 M)) where
    eps_z < 0.005, as the reference code does (on the signed draw: about 69% of them at sigma_end = 0.01).
    Draw order, from `generator`: m, eps_z, restricted m, eps_x. z is floored at 1e-10, as in the reference.
    """
    if not (M > 0 and tau > 0 and sigma_end > 0):
        raise ValueError(f"need M > 0, tau > 0 and sigma_end > 0, got {M}, {tau}, {sigma_end}")
    shape = [int(s) for s in shape]
    batch, f64 = shape[0], torch.float64
    if device is None:
        device = rng.device_of(generator)
    m = rng.rand([batch], generator, device=device, dtype=f64) * M
    eps_z = rng.randn([batch], generator, device=device, dtype=f64) * sigma_end
    if restrict_M:
        m_restricted = rng.rand([batch], generator, device=device, dtype=f64) * int(M * _RESTRICT_FRACTION)
        m = torch.where(eps_z < _RESTRICT_Z, m_restricted, m)
    multiplier = (1 + tau) ** m
    n = rng.randn(shape, generator, device=device, dtype=torch.float32)
    n = n * (sigma_end * multiplier).to(torch.float32).reshape(-1, *([1] * (len(shape) - 1)))
    return (eps_z.abs() * multiplier).to(torch.float32).clamp_min(_Z_FLOOR), n


class PFGMLoss(Loss):
    """PFGM's objective: |v_theta(x, z) - v(x, z)|^2 over N + 1 components, v the normalised field of the
    training batch and a reference batch (PFGM puts its mini-batch inside the large batch; `reference` is
    the gathered reference batch of the training loop). Returns the per-element loss [B, N + 1]."""

    options = ("pfgm_M", "tau", "gamma", "sigma_end", "z_max", "z_min", "upper_norm", "z_exp", "restrict_M")
    needs = "field"
    needs_reference = True

    @classmethod
    def configure(cls, options: dict, *, D: float, cond: bool, pfgmpp_on: bool) -> tuple[float, dict, dict]:
        """The paper's settings where an option is unset (M, z_max and upper_norm: `complete`); D = 1."""
        if pfgmpp_on:
            raise ValueError("--precond=pfgm is PFGM (D = 1) with its own objective: drop --pfgmpp/--aug_dim "
                             "(for the PFGM++ objective at D = 1 use --precond=edm --pfgmpp=1 --aug_dim=1)")
        if cond:
            raise ValueError("--precond=pfgm computes its field over an unlabelled reference batch: it cannot be "
                             "combined with --cond=1")
        o = {k: options.get(k) for k in cls.options}
        _check_options(o)
        o = {k: PAPER_SETTINGS[k] if v is None and k in PAPER_SETTINGS else v for k, v in o.items()}
        loss_kwargs = dict(M=o["pfgm_M"], tau=o["tau"], sigma_end=o["sigma_end"], gamma=o["gamma"], restrict_M=o["restrict_M"])
        precond_kwargs = dict(D=1.0, sigma_min=o["z_min"], sigma_max=o["z_max"], upper_norm=o["upper_norm"],
                              gamma=o["gamma"], z_exp=o["z_exp"])
        return 1.0, precond_kwargs, loss_kwargs

    @classmethod
    def complete(cls, c: dict, dataset) -> None:
        """M, z_max and upper_norm left unset, from PFGM's helper (`derive_hparams`) on the data."""
        loss, precond = c["loss_kwargs"], c["precond_kwargs"]
        if loss["M"] is not None and precond["sigma_max"] is not None and precond["upper_norm"] is not None:
            return
        N = dataset.num_channels * dataset.resolution**2
        derived = derive_hparams(average_norm(dataset), N, loss["sigma_end"], loss["tau"])
        for kwargs, key, name in ((loss, "M", "M"), (precond, "sigma_max", "z_max"), (precond, "upper_norm", "upper_norm")):
            if kwargs[key] is None:
                kwargs[key] = derived[name]
        if not precond["sigma_min"] < precond["sigma_max"]:
            raise ValueError(f"--z_min ({precond['sigma_min']}) must be smaller than z_max ({precond['sigma_max']})")
        c["pfgm_data_norm"] = derived["data_norm"]

    def __init__(self, M: float = 291, tau: float = 0.03, sigma_end: float = 0.01, gamma: float = 5.0,
                 restrict_M: bool = True, chunk: int = 1024):
        if not (M > 0 and tau > 0 and sigma_end > 0 and gamma >= 0 and chunk >= 1):
            raise ValueError(f"need M, tau, sigma_end > 0, gamma >= 0, chunk >= 1; got {M}, {tau}, {sigma_end}, {gamma}, {chunk}")
        self.M, self.tau, self.sigma_end, self.gamma = float(M), float(tau), float(sigma_end), float(gamma)
        self.restrict_M, self.chunk = bool(restrict_M), int(chunk)

    def draw(self, shape, device, generator: rng.Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z [B], noise n [B, ...]) for a batch of `shape` (the training loop draws the global batch)."""
        return perturb(shape, self.M, self.tau, self.sigma_end, self.restrict_M, generator, device)

    def __call__(self, net, images, labels=None, augment_pipe=None, generator=None, reference=None, draws=None):
        """Per-element squared error [B, N + 1] of the predicted field; `draws` = (z, n) from `draw`."""
        if labels is not None:
            raise ValueError("the PFGM field is computed over an unlabelled reference batch: train unconditional models")
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        z, n = draws if draws is not None else self.draw(y.shape, y.device, generator)
        x = y + n.to(y.dtype)
        with torch.no_grad():
            data = y if reference is None else torch.cat([y, reference.to(y.dtype)])
            target_x, target_z = normalized_field(x, z, data, self.gamma, self.chunk)
        v_x, v_z = net(x, z, None, augment_labels=augment_labels, return_field=True)
        error_x = (v_x - target_x.to(v_x.dtype)).flatten(1).square()
        error_z = (v_z - target_z.to(v_z.dtype)).square()[:, None]
        return torch.cat([error_x, error_z], dim=1)


# ----------------------------------------------------------------------------------------------
# Training options (train.py --precond=pfgm)

# The paper's settings (PFGM, Xu et al. 2022, CIFAR-10) for options left unset; M, z_max and upper_norm are
# derived from the data (`PFGMLoss.complete`).
PAPER_SETTINGS = dict(tau=0.03, gamma=5.0, sigma_end=0.01, z_min=1e-3, z_exp=5.0, restrict_M=True)


def _check_options(o: dict) -> None:
    """ValueError, naming the flag, for PFGM options that cannot work."""
    for name in ("pfgm_M", "tau", "sigma_end", "z_max", "z_min", "upper_norm"):
        if o[name] is not None and not o[name] > 0:
            raise ValueError(f"--{name} must be > 0, got {o[name]}")
    for name in ("gamma", "z_exp"):
        if o[name] is not None and not o[name] >= 0:
            raise ValueError(f"--{name} must be >= 0, got {o[name]}")
    z_min = PAPER_SETTINGS["z_min"] if o["z_min"] is None else o["z_min"]
    if o["z_max"] is not None and not z_min < o["z_max"]:
        raise ValueError(f"--z_min ({z_min}) must be smaller than --z_max ({o['z_max']})")


# ----------------------------------------------------------------------------------------------
# Hyper-parameters (PFGM App. B.1.1 and B.2.1, as computed by the reference's hyperparam_calculator.py)


def derive_hparams(data_norm: float, N: int, sigma_end: float = 0.01, tau: float = 0.03) -> dict:
    """M, z_max and upper_norm from the average data norm and the data dimension N.

    With N~ = N + 1 and the largest perturbation scale s = sigma_end (1 + tau)^M:
    M = floor(0.75 ln(data_norm^2 / (2 sqrt(N~) sigma_end^2)) / ln(1 + tau)) + 1, z_max = sqrt(2 / pi) s (the
    mean of |eps_z| (1 + tau)^M) and upper_norm = sqrt(N~) s (the typical norm of the largest perturbation).
    """
    if not all(math.isfinite(v) and v > 0 for v in (data_norm, sigma_end, tau)) or int(N) < 1:
        raise ValueError(f"need finite data_norm > 0, sigma_end > 0, tau > 0 and N >= 1; got {data_norm}, {sigma_end}, {tau}, {N}")
    n_aug = int(N) + 1
    ratio = data_norm**2 / (2 * math.sqrt(n_aug) * sigma_end**2)
    if ratio <= 1:
        raise ValueError(f"data_norm {data_norm} is too small for sigma_end {sigma_end}: lower sigma_end")
    M = int(0.75 * math.log(ratio) / math.log1p(tau)) + 1
    scale = sigma_end * (1 + tau) ** M
    return {"M": M, "z_max": math.sqrt(2 / math.pi) * scale, "upper_norm": math.sqrt(n_aug) * scale,
            "N": int(N), "data_norm": float(data_norm), "sigma_end": float(sigma_end), "tau": float(tau)}


def average_norm(dataset, max_images: int = 10000) -> float:
    """Mean |y| of up to `max_images` evenly spaced images of a dataset, scaled to [-1, 1] as in training."""
    count = len(dataset)
    if count == 0:
        raise ValueError("the dataset is empty: cannot measure its average norm")
    indices = torch.linspace(0, count - 1, min(count, int(max_images))).round().long().unique().tolist()
    norms = [(torch.as_tensor(dataset[i][0], dtype=torch.float64) / 127.5 - 1).norm().item() for i in indices]
    return sum(norms) / len(norms)


