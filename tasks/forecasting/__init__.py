"""What a run will cost before it starts, the cost ceiling while it runs, and the calibration
run that measures a job without history."""
