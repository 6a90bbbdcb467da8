"""Pure per-batch functions of stage one: image decoding and crop, VAE and teacher encoders."""
