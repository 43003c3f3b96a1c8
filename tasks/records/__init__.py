"""Rows in and out of one shard: reading rows, building prompts, the row cache, writing a part
with its lineage, the per-shard result and the rows' quality profile."""
