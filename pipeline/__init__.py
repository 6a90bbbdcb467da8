"""Stage one orchestration: shard plan, dask tasks, resume and commit."""
