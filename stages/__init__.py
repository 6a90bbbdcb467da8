"""Pure per-batch functions of stage one: dataset listing, image decoding and crop, VAE and teacher encoders."""
