"""Running shards: the job and plan handed to a flow run without credentials in its parameters,
one shard end to end, and where shard tasks run (threads, worker processes, Ray)."""
