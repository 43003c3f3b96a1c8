"""Date partitions for nightly and backfill runs, their idempotency keys, and the backfill report."""
