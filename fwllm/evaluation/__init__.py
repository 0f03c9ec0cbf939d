"""Evaluation of merged models: lm-eval task suites for causal LMs, GLUE for encoders.

Submodules stay import-light on purpose (lm-eval and transformers load only when an
evaluation actually runs): `metrics` and `answers` are pure, `tasks` knows names and
paths, `encoder` scores classification heads, `runner` drives lm-eval and caching,
`report` writes tables and plots, `cli` is the `fwllm eval` verb.
"""
