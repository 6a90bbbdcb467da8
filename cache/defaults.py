"""Defaults of the cache commands, in a module that imports nothing: the command line reads them
to build its options without importing zarr, dask or pyarrow."""

#: Shards ``repa cache copy`` copies concurrently.
DEFAULT_COPY_JOBS = 8
#: Samples ``repa stats`` reads for its latent and feature statistics.
DEFAULT_MAX_SAMPLES = 10_000
#: Bytes of sample data per tar shard of ``repa export-wds``.
DEFAULT_SHARD_BYTES = 1_000_000_000
