"""Low-level PyTorch utilities: distributed setup and random number generation."""
