"""Calibration data: reading rows, tokenizing them into micro-batches, and the objective
every data-informed method minimises or measures."""
