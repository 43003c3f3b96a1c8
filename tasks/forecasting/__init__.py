"""What a run will cost before it starts (sampled token counts, earlier runs' figures, the
forecast's arithmetic), the cost ceiling while it runs, and the calibration run that measures a
job without history."""
