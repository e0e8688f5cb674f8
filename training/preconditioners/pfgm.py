"""PFGM (Xu et al. 2022), the D = 1 member of PFGM++: field target, perturbation, loss, hyper-parameters, sampler.

Data y in R^N sit at z = 0 of R^(N+1). For a set {y_i} the empirical Poisson field at x~ = (x, z), with the
coefficients normalised to sum to 1 (PFGM's c(x~)), is

    E(x~) = sum_i w_i (y~_i - x~),   w_i proportional to |x~ - y~_i|^-(N+1),

and the training target is v = sqrt(N + 1) E / (|E| + gamma), as specified for this project (PFGM's
reference code scales by sqrt(N); the two differ by a factor 1 + O(1/N), which the ODE, a function of
v_x / v_z only, does not see). Since every y~_i has z = 0, E = (E[y|x] - x, -z) exactly, where E[y|x] is
the PFGM++ posterior mean at D = 1 with r = z: `training.pfgmpp.posterior_mean` (chunked, float64) is the
one implementation of both. The same identity turns a PFGM network into a denoiser (`PFGMPrecond`), so its
backward ODE in t = ln z, dx/dt = z v_x / v_z, is the probability-flow ODE of that denoiser
(`training.samplers.pfgm`, PFGM's sampler; every other sampler runs PFGM networks too).

Everything of the PFGM baseline but its sampler lives here: the field, the perturbation, the loss, the
hyper-parameter helper (`pfgmpp-pfgm-hparams`, training/cli/pfgm_hparams.py) and the preconditioner with its
training options (train.py --precond=pfgm):

    pfgmpp-pfgm-hparams --data_norm=32 --resolution=32     # CIFAR-10: M = 291
"""

from __future__ import annotations

import math

import torch

from dnnlib.util import records_init_kwargs
from torch_utils import rng
from training import pfgmpp
from training.pfgmpp import check_D
from training.preconditioners.base import Precond
from training.preconditioners.losses import Loss

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

    needs_reference = True

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


# ----------------------------------------------------------------------------------------------
# The preconditioner and its training options (train.py --precond=pfgm)

# The paper's settings (PFGM, Xu et al. 2022, CIFAR-10) for options left unset; M, z_max and upper_norm are
# derived from the data (`PFGMPrecond.complete_config`).
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


# The z-component of the predicted field is kept below -_V_Z_CEILING, so that x - z v_x / v_z stays finite.
_V_Z_CEILING = 1e-5


@records_init_kwargs
class PFGMPrecond(Precond):
    """PFGM (D = 1, Xu et al. 2022): the network predicts the normalised Poisson field (v_x, v_z) in N + 1 dims.

    As in PFGM's reference code: the input is x itself (no c_in scaling), the noise label is ln z, and the
    network has img_channels + 1 output channels: v_x is the first img_channels, v_z the spatial mean of the
    last. `field` (or `forward(..., return_field=True)`, for DDP) returns (v_x, v_z), the training target's
    form. Called like every preconditioner, the network is a denoiser: the field of a finite set is parallel
    to (E[y|x] - x, -z) with E[y|x] the PFGM++ posterior mean at D = 1, r = z (see the module docstring), so
    D(x, sigma = z) = x - z v_x / v_z, and every sampler of this project runs PFGM networks. The PFGM
    sampling settings travel with the network: sigma_max = z_max, sigma_min = z_min, upper_norm (the prior's
    norm is clipped there), gamma and z_exp (below z_exp, v_z is derived from |v_x|, PFGM App. B.2.3).
    """

    loss_class = PFGMLoss
    training_options = ("pfgm_M", "tau", "gamma", "sigma_end", "z_max", "z_min", "upper_norm", "z_exp", "restrict_M")

    @classmethod
    def out_channels(cls, img_channels: int) -> int:
        """v_x, and one more channel whose spatial mean is v_z."""
        return img_channels + 1

    @classmethod
    def training_kwargs(cls, *, D: float, cond: bool, pfgmpp_on: bool, options: dict) -> tuple[float, dict, dict]:
        """The paper's settings where an option is unset (M, z_max and upper_norm: `complete_config`); D = 1."""
        if pfgmpp_on:
            raise ValueError("--precond=pfgm is PFGM (D = 1) with its own objective: drop --pfgmpp/--aug_dim "
                             "(for the PFGM++ objective at D = 1 use --precond=edm --pfgmpp=1 --aug_dim=1)")
        if cond:
            raise ValueError("--precond=pfgm computes its field over an unlabelled reference batch: it cannot be "
                             "combined with --cond=1")
        o = {k: options.get(k) for k in cls.training_options}
        _check_options(o)
        o = {k: PAPER_SETTINGS[k] if v is None and k in PAPER_SETTINGS else v for k, v in o.items()}
        loss_kwargs = dict(M=o["pfgm_M"], tau=o["tau"], sigma_end=o["sigma_end"], gamma=o["gamma"], restrict_M=o["restrict_M"])
        precond_kwargs = dict(D=1.0, sigma_min=o["z_min"], sigma_max=o["z_max"], upper_norm=o["upper_norm"],
                              gamma=o["gamma"], z_exp=o["z_exp"])
        return 1.0, precond_kwargs, loss_kwargs

    @classmethod
    def complete_config(cls, c: dict, dataset) -> None:
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

    def __init__(self, model, *, gamma: float = 5.0, z_exp: float = 5.0, upper_norm: float = 3000.0, D: float = 1.0,
                 **kwargs):
        if check_D(D) != 1.0:
            raise ValueError(f"PFGM is D = 1, got D={D}; for PFGM++ at other D use EDMPrecond with that D")
        if not (gamma >= 0 and z_exp >= 0 and upper_norm > 0):
            raise ValueError(f"need gamma >= 0, z_exp >= 0 and upper_norm > 0, got {gamma}, {z_exp}, {upper_norm}")
        kwargs.setdefault("sigma_min", 1e-3)  # PFGM's z_min for CIFAR-10
        kwargs.setdefault("sigma_max", 40.0)  # PFGM's z_max for CIFAR-10
        super().__init__(model, D=1.0, **kwargs)
        self.gamma, self.z_exp, self.upper_norm = float(gamma), float(z_exp), float(upper_norm)

    def field(self, x, z, class_labels=None, force_fp32: bool = False, augment_labels=None):
        """The predicted normalised field (v_x [B, C, H, W], v_z [B]) at (x, z), float32."""
        x, z, class_labels, dtype = self._inputs(x, z, class_labels, force_fp32)
        c_noise = z.log().reshape(-1).expand(x.shape[0])
        F_x = self.model(x.to(dtype), c_noise, class_labels=class_labels, augment_labels=augment_labels).to(torch.float32)
        return F_x[:, : self.img_channels], F_x[:, self.img_channels].flatten(1).mean(dim=1)

    def z_component(self, v_x: torch.Tensor, v_z: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """v_z, replaced below z_exp by the value |v_x| implies (PFGM App. B.2.3), kept < 0."""
        if self.z_exp > 0 and self.gamma > 0:
            scale = math.sqrt(v_x[0].numel() + 1)  # the target's sqrt(N + 1) (`normalized_field`)
            # |v_x| / scale ~ |E| / (|E| + gamma) gives |E|; then v_z = -scale z / (|(E, z)| + gamma).
            ratio = (v_x.flatten(1).norm(dim=1) / scale).clamp(max=1 - 1e-6)
            norm = self.gamma * ratio / (1 - ratio)
            implied = -scale * z / ((norm.square() + z.square()).sqrt() + self.gamma)
            v_z = torch.where(z < self.z_exp, implied, v_z)
        return v_z.clamp(max=-_V_Z_CEILING)

    def forward(self, x, sigma, class_labels=None, force_fp32: bool = False, augment_labels=None,
                return_field: bool = False):
        """D(x, sigma) = x - sigma v_x / v_z with z = sigma; with return_field, the field (v_x, v_z) itself."""
        v_x, v_z = self.field(x, sigma, class_labels, force_fp32, augment_labels)
        if return_field:
            return v_x, v_z
        x = x.to(torch.float32)
        z = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        ratio = z / self.z_component(v_x, v_z, z)
        return x - ratio.reshape(-1, *([1] * (x.ndim - 1))) * v_x
