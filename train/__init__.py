"""Stage two: the cache-backed REPA trainer (SiT, transport, REPA loss, data, loop, checkpoints)."""
