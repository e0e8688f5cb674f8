"""Likelihood in bits/dim for any D: the probability-flow ODE and the instantaneous change of variables.

With t = ln(sigma) the PFGM++ ODE is dx/dt = f(x, t) = x - D(x, sigma) for every D (PFGM++ eq. 7 with
r = sigma sqrt(D)). The model is the pushforward of the prior p_{r_max} (the kernel at sigma_max centred
at 0) along this flow, so for data x at sigma_min (Score SDE App. D.2, Chen et al. 2018):

    log p(x) = log p_{r_max}(x_T) + int_{ln sigma_min}^{ln sigma_max} div f(x_t, t) dt,   div f = N - div D,

x_T the end of the flow, integrated together with the log-determinant by the adaptive Dormand-Prince
solver of `training.ode`. The prior term is the exact kernel log-density `pfgmpp.log_prob` in float64.
div D is exact (N vector-Jacobian products; small N) or Hutchinson's estimate v^T J v with Rademacher or
Gaussian probes, fixed along each trajectory, several averaged.

Bits/dim of 8-bit images (docs/likelihood.md): pixel values k in {0..255} are the training points
x = k / 127.5 - 1; uniform dequantisation x = (k + u - 1/2) / 127.5 - 1, u ~ U[0, 1)^N, gives
    bpd = -E_u[log p(x)] / (N ln 2) + log2(127.5),
the same bound on the discrete NLL as Score SDE's -log p(z) / (N ln 2) + 8 for z = (k + u) / 256 in [0, 1).

    torchrun --standalone --nproc_per_node=8 -m training.likelihood --network=net.pt \\
        --data=datasets/cifar10-32x32-test.zip --out=bpd.json
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import click
import torch
import tqdm

from dnnlib import util
from torch_utils import distributed, rng
from training import generation, ode, pfgmpp, sampling

ESTIMATORS = ("rademacher", "gaussian", "exact")
PROBE_KINDS = ("rademacher", "gaussian")
BIN_WIDTH = 1 / 127.5  # one 8-bit level in the model's units, x = k / 127.5 - 1


# ----------------------------------------------------------------------------------------------
# Divergence estimators (shared with the FP regulariser).


def draw_probes(shape: Sequence[int], kind: str = "rademacher", count: int = 1, generator: rng.Generators = None,
                device=None, dtype=torch.float32) -> torch.Tensor:
    """Hutchinson probes [B, count, ...] for inputs of `shape` = [B, ...]: E[v v^T] = I."""
    if kind not in PROBE_KINDS:
        raise ValueError(f"probe kind must be one of {', '.join(PROBE_KINDS)}, got {kind!r}")
    if int(count) < 1:
        raise ValueError(f"the number of probes must be >= 1, got {count}")
    shape = [int(shape[0]), int(count), *[int(s) for s in shape[1:]]]
    if kind == "gaussian":
        return rng.randn(shape, generator, device=device, dtype=dtype)
    u = rng.rand(shape, generator, device=device, dtype=dtype)
    return torch.where(u < 0.5, -torch.ones_like(u), torch.ones_like(u))


def divergence(outputs: torch.Tensor, inputs: torch.Tensor, probes: torch.Tensor | None = None,
               create_graph: bool = False) -> torch.Tensor:
    """Per-sample div of outputs(inputs), Tensor[B]: Hutchinson's mean over probes [B, K, ...], exact if None.

    `outputs` must be a differentiable function of `inputs` (same shape [B, ...], no mixing across rows).
    The estimate v^T J v takes one vector-Jacobian product per probe; the exact trace takes N of them.
    """
    if outputs.shape != inputs.shape:
        raise ValueError(f"outputs {list(outputs.shape)} and inputs {list(inputs.shape)} must have the same shape")
    batch = inputs.shape[0]
    if probes is None:
        flat = outputs.reshape(batch, -1)
        total = torch.zeros([batch], dtype=outputs.dtype, device=outputs.device)
        for i in range(flat.shape[1]):
            (grad,) = torch.autograd.grad(flat[:, i].sum(), inputs, retain_graph=True, create_graph=create_graph)
            total = total + grad.reshape(batch, -1)[:, i]
        return total
    if probes.ndim != inputs.ndim + 1 or probes.shape[0] != batch or probes.shape[2:] != inputs.shape[1:]:
        raise ValueError(f"probes must have shape [B, K, ...] = [{batch}, K, {', '.join(map(str, inputs.shape[1:]))}], "
                         f"got {list(probes.shape)}")
    count = probes.shape[1]
    total = torch.zeros([batch], dtype=outputs.dtype, device=outputs.device)
    for k in range(count):
        v = probes[:, k].to(outputs.dtype)
        (jtv,) = torch.autograd.grad(outputs, inputs, grad_outputs=v, retain_graph=True, create_graph=create_graph)
        total = total + (jtv * v.to(jtv.dtype)).reshape(batch, -1).sum(dim=1).to(total.dtype)
    return total / count


# ----------------------------------------------------------------------------------------------
# The ODE with its log-determinant.


@dataclass
class Likelihood:
    """log p(x) per sample (nats, float64, in the model's units), its two terms, the latents and the cost."""

    log_p: torch.Tensor
    prior_log_p: torch.Tensor
    delta_log_p: torch.Tensor
    latents: torch.Tensor
    nfe: int
    sigma_min: float
    sigma_max: float


def sigma_range(net, sigma_min: float | None = None, sigma_max: float | None = None) -> tuple[float, float]:
    """(sigma_min, sigma_max) of the flow: EDM's [0.002, 80] by default, clamped and rounded by the network."""
    levels = sampling.noise_levels(net, num_steps=2, sigma_min=sigma_min, sigma_max=sigma_max)
    return float(levels[-1]), float(levels[0])


def _check_prior(net) -> None:
    if getattr(net, "upper_norm", None) is not None:
        raise ValueError("this network clips its prior's norm (PFGM's upper_norm): its prior has no kernel density, "
                         "so the likelihood is undefined; use a PFGM++ / diffusion network")


def _augmented_drift(net, class_labels, shape, probes):
    """d[x, delta]/dt = [f, div f] in t = ln sigma, on a flat float64 state [B, N + 1]."""
    base = sampling.log_sigma_drift(net, class_labels)
    batch, N = shape[0], math.prod(shape[1:])

    def drift(t: float, y: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = y[:, :N].reshape(shape).detach().requires_grad_(True)
            f = base(t, x)
            div_D = divergence(x - f, x, probes)  # D = x - f: Hutchinson on D avoids the variance of |v|^2
        div_f = N - div_D.detach().to(y.dtype)
        return torch.cat([f.detach().reshape(batch, N).to(y.dtype), div_f[:, None]], dim=1)

    return drift


def log_likelihood(
    net,
    x: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    probes: torch.Tensor | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> Likelihood:
    """log p(x) under the network's model: the flow from sigma_min to sigma_max with RK45, then the exact prior.

    `x` [B, C, H, W] are data in the model's units (about [-1, 1]) at sigma_min. `probes` [B, K, C, H, W]
    from `draw_probes` give Hutchinson's estimate (unbiased for p's log, fixed along the trajectory);
    None computes div D exactly (N network backward passes per evaluation: small N only).
    """
    _check_prior(net)
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] == 0:
        raise ValueError("x must be a non-empty batch [B, ...]")
    lo, hi = sigma_range(net, sigma_min, sigma_max)
    batch, N = x.shape[0], math.prod(x.shape[1:])
    y0 = torch.cat([x.detach().reshape(batch, N).to(torch.float64),
                    torch.zeros([batch, 1], dtype=torch.float64, device=x.device)], dim=1)
    drift = _augmented_drift(net, class_labels, x.shape, probes)
    solution = ode.rk45(drift, y0, math.log(lo), math.log(hi), rtol=rtol, atol=atol)
    latents = solution.y[:, :N].reshape(x.shape)
    delta = solution.y[:, N]
    prior = pfgmpp.log_prob(latents, hi, net.D)
    return Likelihood(prior + delta, prior, delta, latents, solution.nfe, lo, hi)


# ----------------------------------------------------------------------------------------------
# Bits/dim of 8-bit images.


def dequantize(images: torch.Tensor, generator: rng.Generators = None) -> torch.Tensor:
    """uint8 images [B, C, H, W] to float64 x = (k + u - 1/2) / 127.5 - 1, u ~ U[0, 1): bins centred on k / 127.5 - 1."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 [B, C, H, W] pixel values, got {images.dtype}")
    u = rng.rand(images.shape, generator, device=images.device, dtype=torch.float64)
    return (images.to(torch.float64) + u - 0.5) * BIN_WIDTH - 1


def bits_per_dim(log_p: torch.Tensor, N: int) -> torch.Tensor:
    """bpd = -log p(x) / (N ln 2) + log2(127.5) for log p of dequantised x in the model's units (module docstring)."""
    return -log_p / (N * math.log(2)) + math.log2(127.5)


def image_bpd(
    net,
    images: torch.Tensor,
    generators: Sequence[torch.Generator],
    class_labels: torch.Tensor | None = None,
    dequant: int = 1,
    estimator: str = "rademacher",
    num_probes: int = 1,
    **flow_options,
) -> tuple[torch.Tensor, int]:
    """(bpd per image [B] averaged over `dequant` draws, network evaluations) for uint8 images [B, C, H, W].

    Image i's draws come from generators[i] alone, in the order (u_1, v_1, u_2, v_2, ...), so its result
    does not depend on the batch it is in beyond the solver's tolerance. `flow_options` go to `log_likelihood`.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if int(dequant) < 1:
        raise ValueError(f"dequant (uniform dequantisation draws) must be >= 1, got {dequant}")
    N = math.prod(images.shape[1:])
    total, nfe = torch.zeros([images.shape[0]], dtype=torch.float64, device=images.device), 0
    for _ in range(int(dequant)):
        x = dequantize(images, generators)
        probes = None
        if estimator != "exact":
            probes = draw_probes(images.shape, estimator, num_probes, generators, device=images.device)
        result = log_likelihood(net, x, class_labels, probes, **flow_options)
        total += bits_per_dim(result.log_p, N)
        nfe += result.nfe
    return total / int(dequant), nfe


# ----------------------------------------------------------------------------------------------
# A dataset on one or many ranks.


def image_generators(seed: int, positions: Sequence[int], device) -> list[torch.Generator]:
    """One generator per image, seeded by (seed, position in the dataset): independent of batch and ranks."""
    from training.training_loop import mixed_seed

    return rng.seeded_generators([mixed_seed(seed, p, 9) for p in positions], device)


def dataset_bpd(net, dataset, batch_size: int, device, seed: int = 0, workers: int = 1, progress: bool = False,
                **options) -> dict:
    """bits/dim of every image of `dataset` (uint8 [C, H, W] items), this rank's share, gathered on every rank.

    Returns the mean, its standard error over images (Hutchinson and dequantisation noise included), the
    per-image values in dataset order and the mean network evaluations per ODE solve. `options` go to `image_bpd`.
    """
    count = len(dataset)
    if count == 0:
        raise ValueError("the dataset is empty")
    batches = [list(b) for b in generation.rank_batches(count, batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         prefetch_factor=2 if workers else None)
    values = torch.zeros([count], dtype=torch.float64, device=device)
    nfe = torch.zeros([2], dtype=torch.float64, device=device)
    bar = tqdm.tqdm(total=count, unit="img", disable=not (progress and distributed.is_main()), dynamic_ncols=True)
    for positions, (images, labels) in zip(batches, loader):
        images = torch.as_tensor(images).to(device)
        labels = torch.as_tensor(labels).to(device, torch.float32) if getattr(net, "label_dim", 0) else None
        bpd, evals = image_bpd(net, images, image_generators(seed, positions, device), labels, **options)
        values[positions] = bpd
        nfe += torch.tensor([evals, options.get("dequant", 1)], dtype=torch.float64, device=device)
        bar.update(len(positions) * distributed.get_world_size())
    bar.close()
    values = distributed.all_reduce_sum(values)  # each position is filled by exactly one rank
    nfe = distributed.all_reduce_sum(nfe)
    mean = float(values.mean())
    se = float(values.std(unbiased=True) / math.sqrt(count)) if count > 1 else math.nan
    return dict(bpd=mean, bpd_se=se, num_images=count, nfe_per_solve=float(nfe[0] / max(float(nfe[1]), 1.0)),
                per_image=values.cpu().tolist())


def _d_text(D: float) -> str:
    return "inf" if math.isinf(D) else f"{D:g}"


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option("--network", help="Network snapshot or EDM/PFGM++ checkpoint", metavar="PATH|URL", type=str, required=True)
@click.option("--data", help="Images: a ZIP or folder made by dataset_tool.py", metavar="ZIP|DIR", type=str, required=True)
@click.option("--out", help="Write the results here as JSON (rank 0)", metavar="JSON", type=click.Path(dir_okay=False))
@click.option("--num", help="Evaluate a seeded subset of this many images [default: all]", metavar="INT", type=click.IntRange(min=1))
@click.option("--batch", "batch_size", help="Images per ODE solve per rank", metavar="INT", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--dequant", help="Uniform dequantisation draws averaged per image", metavar="INT", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--estimator", help="Divergence: Hutchinson probes, or exact (small images only)", type=click.Choice(list(ESTIMATORS)), default="rademacher", show_default=True)
@click.option("--probes", "num_probes", help="Hutchinson probes averaged per trajectory", metavar="INT", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--rtol", help="RK45 relative tolerance", metavar="FLOAT", type=click.FloatRange(min=0, min_open=True), default=1e-5, show_default=True)
@click.option("--atol", help="RK45 absolute tolerance", metavar="FLOAT", type=click.FloatRange(min=0, min_open=True), default=1e-5, show_default=True)
@click.option("--sigma_min", help="Where the data sit [default: 0.002, clamped to the network]", metavar="FLOAT", type=click.FloatRange(min=0, min_open=True))
@click.option("--sigma_max", help="Where the prior sits [default: 80, clamped to the network]", metavar="FLOAT", type=click.FloatRange(min=0, min_open=True))
@click.option("--seed", help="Seed of the subset, dequantisation and probes", metavar="INT", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--workers", help="Data loader processes", metavar="INT", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--per_image", help="Also store every image's bits/dim in the JSON", is_flag=True)
def main(network, data, out, num, batch_size, seed, workers, per_image, **options):
    """Bits/dim of a dataset under a trained network (any D), on one or many GPUs (torchrun)."""
    from training.dataset import ImageFolderDataset

    device = distributed.init()
    if out is not None and not Path(out).resolve().parent.is_dir():
        raise click.ClickException(f"--out={out}: its folder does not exist; create it or choose another path")
    try:
        net = generation.load_network(network, device)
        _check_prior(net)
        dataset = ImageFolderDataset(data, max_size=num, random_seed=seed, use_labels=bool(getattr(net, "label_dim", 0)))
        if options["estimator"] == "exact" and math.prod(dataset.image_shape) > 4096:
            raise ValueError(f"--estimator=exact needs {math.prod(dataset.image_shape)} backward passes per network call; "
                             "use --estimator=rademacher for images this large")
    except (ValueError, OSError) as error:
        raise click.ClickException(str(error)) from None
    net.eval().requires_grad_(False)
    generation.precision_context("fp32", device)  # TF32 off: the log-determinant sums N small terms
    distributed.print0(f"{type(net).__name__} D={_d_text(float(net.D))}: {len(dataset)} images of {data} "
                       f"on {distributed.get_world_size()} rank(s)")
    try:
        result = dataset_bpd(net, dataset, batch_size, device, seed=seed, workers=workers, progress=True, **options)
    except (ValueError, RuntimeError) as error:
        raise click.ClickException(str(error)) from None
    lo, hi = sigma_range(net, options["sigma_min"], options["sigma_max"])
    result.update(options)
    result.update(network=network, data=data, D=_d_text(float(net.D)), sigma_min=lo, sigma_max=hi, seed=seed)
    if not per_image:
        result.pop("per_image")
    distributed.print0(f"bits/dim {result['bpd']:.4f} +- {result['bpd_se']:.4f} (standard error, "
                       f"{result['num_images']} images, {result['nfe_per_solve']:.0f} evaluations per solve)")
    if out is not None and distributed.is_main():
        with util.atomic_write(out, "w") as f:
            json.dump(result, f, indent=2)
    distributed.shutdown()


if __name__ == "__main__":
    main()
