"""What a run records and shows: MLflow runs, the end-of-run report and Prefect artifacts,
the figures, and where the wall time went."""
