"""Solvers run models on calibration data and return numbers; they write nothing.

`gradients` (the objective's gradient, whole or layer by layer), `frank_wolfe` (the FW
loop), `per_candidate` (one statistic per candidate, Fisher or Gram), `adamerging`."""
