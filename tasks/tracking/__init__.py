"""What a run records and shows: the MLflow store (``mlflow_store``, the one module that imports
MLflow), what a run logs to it, the end-of-run report, the figures, and where the wall time went."""
