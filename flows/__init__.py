"""shardwise: flows."""
