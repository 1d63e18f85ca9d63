"""l2s: Learn-to-Steer spatial relations in text-to-image diffusion models (WACV 2026)."""

__version__ = "0.1.0"
