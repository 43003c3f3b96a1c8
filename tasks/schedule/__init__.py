"""Date partitions for nightly and backfill runs, and running each partition exactly once."""
