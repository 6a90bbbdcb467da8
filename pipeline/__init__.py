"""Stage one orchestration: source listing, shard plan, dask tasks, resume and commit."""
