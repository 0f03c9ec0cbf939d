"""Pure tensor math in the style of peft's `utils/merge_utils.py`: local merges, the
streamed weighted sum, the sketch and the LMO, and the Fisher / RegMean / AdaMerging
formulas. No I/O, no models, no globals: every function takes tensors and returns one."""
