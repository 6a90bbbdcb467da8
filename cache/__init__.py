"""The cache: format, writer, reader, manifest, statistics and verification (shared by both stages)."""
