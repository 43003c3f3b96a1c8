"""shardwise: tasks."""
