"""FP-Diffusion's score Fokker-Planck regulariser (Lai et al., ICML 2023), an option of the denoising losses (EDM, EDM2, VP, VE).

Every loss of this project trains a denoiser D(x, sigma) in the unscaled variable, whose score is
s = (D - x) / sigma^2. At D = inf the perturbed densities p_sigma = p_data * N(0, sigma^2 I) obey the heat
equation d p / d sigma = sigma Lap p, whatever the preconditioning (VE, VP and EDM only differ in the time
change and scaling, which the denoiser's parameterisation removes). In the time t = ln sigma (the VE SDE's
time up to an affine map; diffusion coefficient g(t)^2 = d sigma^2 / dt = 2 sigma^2):

- scalar (log-density) FPE: d log p / dt = rho := sigma^2 (div s + |s|^2) = div D - N + |D - x|^2 / sigma^2;
- score FPE (its gradient, FP-Diffusion Prop. 3.1): d s / dt = sigma^2 grad(div s + |s|^2).

Residuals, both zero for the exact score:
- vector: eps = sigma d s / d sigma - sigma^2 grad(div s + |s|^2)
               = [sigma d D / d sigma - 2 (D - x) - sigma^2 grad(div D) - grad |D - x|^2] / sigma^2;
- scalar: E_{x ~ p_sigma}[rho] = d/dt int p_sigma = 0, estimated by the batch mean of rho over perturbed
  training points. (The published code penalises the batch norm of rho itself, which is not zero for the
  exact score; its mean is.)

Penalty per sample: alpha * w(sigma) (|eps|^2 / N)^(m/2) + beta * |mean_batch rho / N|^m, added to every
element of the per-element DSM loss, w = g^2 = 2 sigma^2 (ll), g = sqrt(2) sigma (convention) or 1 (constant).
d D / d sigma is a central finite difference in ln sigma; div D is Hutchinson's estimate v^T J v (one
vector-Jacobian product with create_graph=True per probe), grad of it by double backward, all batched.
Dropout draws the same mask in every network call of the regulariser (torch's generators are replayed).

Finite D: PFGM++ marginals obey Laplace's equation in N + D dimensions (second order in r), not a heat
equation, and the network's (D - x) / sigma^2 is the score only as D -> inf. The exact denoiser's
residual shrinks like N / D (tests/test_fp_regularizer.py), so finite D is accepted only for
D >= FINITE_D_RATIO * N, where the derivation holds to that accuracy; see docs/likelihood.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from torch_utils import distributed, rng
from training import divergence, pfgmpp
from training.preconditioners.base import Precond

WEIGHTINGS = ("ll", "convention", "constant")
FINITE_D_RATIO = 1000.0  # finite D must be at least this many times N
# train.py's options of the regulariser (training/train/options.py), read by every loss that offers it.
OPTIONS = ("fp_reg", "fp_alpha", "fp_beta", "fp_order", "fp_weighting", "fp_probe", "fp_probes", "fp_step")


def from_options(options: dict) -> dict:
    """`FPRegularizer`'s keyword arguments from train.py's --fp_* options, checked; ValueError naming the flag."""
    alpha, beta, order, step, probes = (options[k] for k in ("fp_alpha", "fp_beta", "fp_order", "fp_step", "fp_probes"))
    weighting, probe = options["fp_weighting"], options["fp_probe"]
    if not (alpha >= 0 and beta >= 0 and alpha + beta > 0):
        raise ValueError(f"--fp_alpha and --fp_beta must be >= 0 and not both 0 (or use --fp_reg=0), got {alpha}, {beta}")
    if not (order > 0 and step > 0 and probes >= 1):
        raise ValueError(f"--fp_order and --fp_step must be > 0 and --fp_probes >= 1, got {order}, {step}, {probes}")
    if weighting not in WEIGHTINGS or probe not in divergence.PROBE_KINDS:
        raise ValueError(f"--fp_weighting must be one of {', '.join(WEIGHTINGS)} and --fp_probe one of "
                         f"{', '.join(divergence.PROBE_KINDS)}, got {weighting!r}, {probe!r}")
    return dict(alpha=float(alpha), beta=float(beta), m=float(order), weighting=weighting, probe=probe,
                num_probes=int(probes), fd_step=float(step))


def check_D(D: float, N: int) -> None:
    """Raise ValueError unless the score FPE holds for D and data dimension N (D = inf, or D >= FINITE_D_RATIO N)."""
    D = pfgmpp.check_D(D)
    if math.isfinite(D) and D < FINITE_D_RATIO * N:
        raise ValueError(
            f"the score Fokker-Planck regulariser holds for D = inf (diffusion) and approximately for D >= "
            f"{FINITE_D_RATIO:g} N = {FINITE_D_RATIO * N:g}; D = {D:g} is too small (PFGM++ marginals obey Laplace's "
            "equation, not a heat equation): train with --fp_reg=0 or --aug_dim=inf"
        )


@dataclass
class Residuals:
    """vector: eps [B, ...] of the score FPE in t = ln sigma (score units); scalar: rho [B]; div_D [B]."""

    vector: torch.Tensor
    scalar: torch.Tensor
    div_D: torch.Tensor


def score_fpe_residuals(net, x: torch.Tensor, sigma: torch.Tensor, probes: torch.Tensor | None = None,
                        class_labels=None, augment_labels=None, fd_step: float = 1e-2,
                        create_graph: bool = False) -> Residuals:
    """The score FPE residuals of the denoiser `net` at points x [B, ...] and noise levels sigma [B].

    `probes` [B, K, ...] (`training.divergence.draw_probes`) estimate div D; None is exact (small N only).
    `create_graph=True` keeps the graph so that the residuals can be trained on.
    """
    if not fd_step > 0:
        raise ValueError(f"fd_step (the finite-difference step in ln sigma) must be > 0, got {fd_step}")
    batch, N = x.shape[0], math.prod(x.shape[1:])
    sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(batch).to(x.dtype)
    sigma_b = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    replay = rng.replay_point(x.device)  # the same dropout mask in every call
    fp32 = dict(force_fp32=True) if isinstance(net, Precond) else {}  # a finite difference needs full precision

    def call(points, levels):
        replay()
        return net(points, levels, class_labels, augment_labels=augment_labels, **fp32).to(x.dtype)

    # No autocast (bf16 would swamp the finite difference); attention in its composite form, whose backward
    # is itself differentiable (the fused CUDA kernels have no double backward).
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False), sdpa_kernel(SDPBackend.MATH):
        x = x.detach().requires_grad_(True)
        denoised = call(x, sigma_b)
        div_D = divergence.divergence(denoised, x, probes, create_graph=True)
        gap = denoised - x
        gap_sq = gap.reshape(batch, N).square().sum(dim=1)
        phi = sigma.square() * div_D + gap_sq  # sigma^4 (div s + |s|^2) + const
        (grad_phi,) = torch.autograd.grad(phi.sum(), x, create_graph=create_graph)
        x_fixed = x.detach()
        up, down = call(x_fixed, sigma_b * math.exp(fd_step)), call(x_fixed, sigma_b * math.exp(-fd_step))
        d_log_sigma = (up - down) / (2 * fd_step)  # sigma dD/dsigma, central difference in ln sigma
    vector = (d_log_sigma - 2 * gap - grad_phi) / sigma_b.square()
    scalar = div_D - N + gap_sq / sigma.square()
    if not create_graph:
        vector, scalar, div_D = vector.detach(), scalar.detach(), div_D.detach()
    return Residuals(vector, scalar, div_D)


def _unwrap(net):
    """The plain module under torch.compile and DDP: the regulariser's extra calls and double backward bypass
    DDP's forward bookkeeping; their parameter gradients join the same backward pass and its all-reduce."""
    net = getattr(net, "_orig_mod", net)
    return net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net


class _Timer:
    """Seconds spent in a block, accumulated without host-device sync (CUDA events, read at the tick)."""

    def __init__(self):
        self.seconds, self._events = 0.0, []

    def start(self, device: torch.device):
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, begin, device: torch.device) -> None:
        if device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((begin, end))
        else:
            self.seconds += time.perf_counter() - begin

    def pop(self) -> float:
        """The total so far (waits for the recorded events), then reset."""
        total = self.seconds
        for begin, end in self._events:
            end.synchronize()
            total += begin.elapsed_time(end) / 1000
        self.seconds, self._events = 0.0, []
        return total


class FPRegularizer:
    """DSM + alpha (vector score-FPE residual) + beta (scalar residual), as a per-sample penalty (module docstring)."""

    def __init__(self, alpha: float = 0.15, beta: float = 0.01, m: float = 2.0, weighting: str = "ll",
                 probe: str = "rademacher", num_probes: int = 1, fd_step: float = 1e-2, D: float = math.inf):
        if not (alpha >= 0 and beta >= 0 and alpha + beta > 0):
            raise ValueError(f"alpha and beta must be >= 0 and not both 0 (to switch the regulariser off, "
                             f"drop it), got {alpha}, {beta}")
        if not m > 0:
            raise ValueError(f"the order m must be > 0, got {m}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        if probe not in divergence.PROBE_KINDS:
            raise ValueError(f"probe must be one of {', '.join(divergence.PROBE_KINDS)}, got {probe!r}")
        if int(num_probes) < 1 or not fd_step > 0:
            raise ValueError(f"num_probes must be >= 1 and fd_step > 0, got {num_probes}, {fd_step}")
        self.alpha, self.beta, self.m, self.weighting = float(alpha), float(beta), float(m), weighting
        self.probe, self.num_probes, self.fd_step = probe, int(num_probes), float(fd_step)
        self.D = pfgmpp.check_D(D)
        self._sums = None  # device tensor: vector term, scalar term, samples, calls
        self._timer = _Timer()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """w(sigma) in t = ln sigma: g^2 = 2 sigma^2 (ll), g (convention) or 1 (constant)."""
        if self.weighting == "ll":
            return 2 * sigma.square()
        if self.weighting == "convention":
            return math.sqrt(2) * sigma
        return torch.ones_like(sigma)

    def draw_probes(self, shape, device, generator: rng.Generators = None) -> torch.Tensor:
        """Hutchinson probes [B, num_probes, ...] for a batch of `shape`."""
        return divergence.draw_probes(shape, self.probe, self.num_probes, generator, device=device)

    def terms(self, net, x, sigma, probes=None, class_labels=None, augment_labels=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(vector term [B], scalar term []) with graph: w (|eps|^2 / N)^(m/2) per sample and |mean rho / N|^m."""
        batch, N = x.shape[0], math.prod(x.shape[1:])
        check_D(self.D, N)
        res = score_fpe_residuals(net, x, sigma, probes, class_labels, augment_labels, self.fd_step, create_graph=True)
        sigma = torch.as_tensor(sigma, device=x.device, dtype=res.vector.dtype).reshape(-1).expand(batch)
        vector = self.weight(sigma) * (res.vector.reshape(batch, N).square().mean(dim=1)).pow(self.m / 2)
        scalar = (res.scalar / N).mean().abs().pow(self.m)
        return vector, scalar

    def __call__(self, net, x, sigma, probes=None, class_labels=None, augment_labels=None) -> torch.Tensor:
        """The penalty per sample [B]: alpha * vector term + beta * scalar term; records tick statistics."""
        begin = self._timer.start(x.device)
        vector, scalar = self.terms(_unwrap(net), x, sigma, probes, class_labels, augment_labels)
        penalty = self.alpha * vector + self.beta * scalar
        self._timer.stop(begin, x.device)
        record = torch.stack([vector.detach().sum(), scalar.detach() * x.shape[0],
                              vector.new_tensor(x.shape[0]), vector.new_tensor(1)]).to(torch.float64)
        self._sums = record if self._sums is None else self._sums + record
        return penalty

    def tick_stats(self, device) -> dict:
        """Means since the last call over all ranks: fp_vector, fp_scalar (per sample); fp_sec: this rank's time."""
        sums = torch.zeros(4, dtype=torch.float64, device=device) if self._sums is None else self._sums
        sums = distributed.all_reduce_sum(sums.clone()).cpu().tolist()
        self._sums = None
        count = max(sums[2], 1.0)
        return dict(fp_vector=sums[0] / count, fp_scalar=sums[1] / count, fp_sec=self._timer.pop())
