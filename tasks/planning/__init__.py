"""Which rows form which shard, from Parquet footers alone, before any data is read."""
