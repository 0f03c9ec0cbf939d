"""Reading and writing: model folders, tensor and adapter readers, the stores a plan keeps
(statistics, merged tensors), staged output, plots. No model is run here."""
