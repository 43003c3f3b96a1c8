"""Where bytes live: the fsspec seam every read and write goes through, the one owner of an
output directory's files, and where local state (the MLflow database) is kept."""
