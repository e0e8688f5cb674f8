"""The loss protocol, and the denoising loss that EDM (PFGM++), EDM2, VP and VE share: one perturbation path for every D.

A loss is a callable `loss_fn(net, images, labels=None, augment_pipe=None, generator=None, reference=None,
draws=None)` returning the per-element loss, where `net` is a preconditioned network (`training.preconditioners`).
The training loop draws the random parts of its rows of the global batch with `loss_fn.draw(shape, device,
generator)` (the noise level first: the loop buckets its statistics by it) and passes them as `draws`; when
`loss_fn.needs_reference` it gathers a reference batch and passes it through `loss_fn.reference_batch`; it adds
`loss_fn.tick_stats(device, steps)` to each tick's statistics.

What a run's configuration needs from a loss, the loss class declares (the configuration never asks which one
it holds):

- `options`: the objective options of train.py it reads (`training.train.options`); another loss's option is
  refused, naming the losses that read it;
- `needs`: the output of the preconditioned network it trains besides the denoised image (EDM2's 'logvar',
  PFGM's 'field'), or None; it trains exactly the preconditioners whose `outputs` are that (`compatible`);
- `configure(options, ...)`: D, and the keyword arguments of the preconditioner and of the loss, for a run;
- `complete(c, dataset)`: what depends on the data once it is open (PFGM's M, z_max, upper_norm).

The denoising losses return lambda(sigma) ||D_theta(y + n, sigma) - target||^2 (`KernelLoss.denoising_loss`, which
a loss that trains more of the network, such as EDM2's learned log-variance, overrides); given the generator
they are deterministic: sigma is drawn first, then the kernel noise n ~ p_r (r = sigma sqrt(D); Gaussian at
D = inf), so the D = inf path draws exactly what EDM's loss draws.
"""

from __future__ import annotations

import inspect
import math
from typing import ClassVar

import torch

from torch_utils import rng
from training import pfgmpp
from training.losses import fp_regularizer
from training.losses.fp_regularizer import FPRegularizer


class Loss:
    """What the training loop and the configuration ask of every loss besides calling it (module docstring)."""

    options: ClassVar[tuple[str, ...]] = ()
    needs: ClassVar[str | None] = None
    needs_reference = False

    @classmethod
    def compatible(cls, precond: type) -> bool:
        """Whether this loss trains the preconditioner class `precond`: every extra output it has, and no other."""
        return tuple(precond.outputs) == (() if cls.needs is None else (cls.needs,))

    @classmethod
    def configure(cls, options: dict, *, D: float, cond: bool, pfgmpp_on: bool) -> tuple[float, dict, dict]:
        """(D, preconditioner kwargs, loss kwargs) of a run; ValueError naming the flag when options conflict.

        `options` holds every objective option of train.py by flag name (None: unset); D comes from
        --pfgmpp/--aug_dim, cond from --cond. This default passes the options it reads, under their names,
        to the loss (an unset one takes the loss's default).
        """
        return D, dict(D=D), {k: options[k] for k in cls.options if options.get(k) is not None}

    @classmethod
    def complete(cls, c: dict, dataset) -> None:
        """Fill in the entries of a configuration `c` that depend on the data, once `dataset` is open."""

    def draw(self, shape, device, generator: rng.Generators = None) -> tuple[torch.Tensor, ...]:
        """The random parts of a batch of `shape`: (noise level [B], ...) per sample."""
        raise NotImplementedError

    def tick_stats(self, device, steps: int) -> dict:
        """Statistics this loss adds to a tick (reduced over ranks), given the tick's optimizer steps."""
        return {}

    def reference_batch(self, images: torch.Tensor, augment_pipe=None) -> torch.Tensor:
        """The reference batch as this loss averages over it, from the gathered reference images in [-1, 1]."""
        return images


class KernelLoss(Loss):
    """Shared path: noise level, augmentation hook, PFGM++ perturbation, target and weight.

    Options: the stable target field (--stf) and FP-Diffusion's regulariser (--fp_reg and its --fp_* settings);
    a subclass adds the options of its noise-level distribution.
    """

    options = ("stf", *fp_regularizer.OPTIONS)

    @classmethod
    def configure(cls, options: dict, *, D: float, cond: bool, pfgmpp_on: bool) -> tuple[float, dict, dict]:
        """The options the loss's constructor takes by name, --stf and the regulariser's (`fp_regularizer.from_options`)."""
        if options.get("stf") and cond:
            raise ValueError("--stf averages over an unlabelled reference batch: it cannot be combined with --cond=1")
        named = set(inspect.signature(cls).parameters) - {"stf", "fp"}
        kwargs = {k: options[k] for k in cls.options if k in named and options.get(k) is not None}
        kwargs.update(D=D, stf=bool(options.get("stf")))
        if options.get("fp_reg"):
            kwargs["fp"] = fp_regularizer.from_options(options)
        return D, dict(D=D), kwargs

    @classmethod
    def complete(cls, c: dict, dataset) -> None:
        """The regulariser's score FPE holds for D = inf or D >> N (`fp_regularizer.check_D`), N from the data."""
        if c["loss_kwargs"].get("fp"):
            fp_regularizer.check_D(c["D"], dataset.num_channels * dataset.resolution**2)

    def __init__(self, D: float = math.inf, stf: bool = False, stf_chunk: int = 1024, fp: dict | None = None):
        self.D = pfgmpp.check_D(D)
        self.stf = bool(stf)
        if stf_chunk < 1:
            raise ValueError(f"stf_chunk must be >= 1, got {stf_chunk}")
        self.stf_chunk = int(stf_chunk)
        self.fp = FPRegularizer(D=self.D, **fp) if fp else None  # FP-Diffusion's score FPE regulariser, off by default

    @property
    def needs_reference(self) -> bool:
        """The stable target field averages over a reference batch."""
        return self.stf

    def reference_batch(self, images: torch.Tensor, augment_pipe=None) -> torch.Tensor:
        """The stable target field's reference set: augmented like the training images it is compared with (as the
        PFGM++ reference code does), so that E[y | x] is the posterior mean of the distribution being learned."""
        return augment_pipe(images)[0] if self.stf and augment_pipe is not None else images

    def tick_stats(self, device, steps: int) -> dict:
        """The regulariser's terms and its own seconds per step (this rank's), when it is on."""
        if self.fp is None:
            return {}
        fp = self.fp.tick_stats(device)
        return dict(fp_vector=fp["fp_vector"], fp_scalar=fp["fp_scalar"], fp_sec_per_step=fp["fp_sec"] / max(steps, 1))

    def sample_sigma(self, batch: int, device, generator: rng.Generators = None) -> torch.Tensor:
        """Training noise levels, Tensor[batch] float32."""
        raise NotImplementedError

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Loss weight lambda(sigma)."""
        raise NotImplementedError

    def target(self, y: torch.Tensor, perturbed: torch.Tensor, sigma: torch.Tensor, reference) -> torch.Tensor:
        """The regression target: y, or with the stable target field E[y | perturbed] over a reference set."""
        if not self.stf:
            return y
        data = y if reference is None else torch.cat([y, reference.to(y.dtype)])
        return pfgmpp.posterior_mean(perturbed, sigma, self.D, data, chunk=self.stf_chunk)

    def denoising_loss(self, net, x: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor, labels=None,
                       augment_labels=None) -> torch.Tensor:
        """Per-element lambda(sigma) (D_theta(x, sigma) - target)^2, sigma shaped [B, 1, ..., 1].

        A loss that also trains another output of the network (EDM2's learned log-variance) overrides this.
        """
        denoised = net(x, sigma, labels, augment_labels=augment_labels)
        return self.weight(sigma) * (denoised - target) ** 2

    def draw(self, shape, device, generator: rng.Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma [B], noise n [B, ...]) for a batch of `shape`: sigma first, then the kernel noise."""
        sigma = self.sample_sigma(shape[0], device, generator)
        noise = pfgmpp.sample_prior(shape, sigma, self.D, generator=generator, device=device)
        if self.fp is None:
            return sigma, noise
        return sigma, noise, self.fp.draw_probes(shape, device, generator)  # the regulariser's Hutchinson probes

    def __call__(self, net, images, labels=None, augment_pipe=None, generator=None, reference=None, draws=None):
        """Per-element weighted loss; `draws` = (sigma, noise[, probes]) from `draw`, else drawn here from `generator`."""
        if self.stf and labels is not None:
            raise ValueError(
                "the stable target field averages over an unlabelled reference batch: "
                "train conditional models without stf"
            )
        if draws is None:
            sigma = self.sample_sigma(images.shape[0], images.device, generator)
        else:
            sigma, n, *probes = draws
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        if draws is None:
            n = pfgmpp.sample_perturbation(y, sigma, self.D, generator)
        perturbed = y + n.to(y.dtype)
        sigma_b = sigma.reshape(-1, *([1] * (y.ndim - 1)))
        target = self.target(y, perturbed, sigma, reference)
        loss = self.denoising_loss(net, perturbed, sigma_b, target, labels, augment_labels)
        if self.fp is not None:  # alpha (vector) + beta (scalar) FPE terms, added to every element of the sample
            probes = probes[0] if draws is not None and probes else self.fp.draw_probes(y.shape, y.device, generator)
            penalty = self.fp(net, perturbed, sigma, probes, labels, augment_labels)
            loss = loss + penalty.to(loss.dtype).reshape(sigma_b.shape)
        return loss
