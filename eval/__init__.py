"""Evaluation: samplers, image export, FID and alignment metrics."""
