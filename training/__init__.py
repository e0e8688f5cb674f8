"""PFGM++ library: kernel, preconditioning, losses, sampler."""
