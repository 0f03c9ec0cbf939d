"""The benchmark harness (eval/ only; fwllm never imports it): the merge matrix scored with
lm-eval (`matrix`, `dev_losses`) and the full quality benchmark (`quality_bench`, `held_out`),
which runs fwllm's own pool-quality engine (`fwllm.demo.pool_quality`, what `fwllm demo`
runs in a small configuration) with the benchmark's methods, rows and held-out GLUE tasks.

eval/*.py scripts import it as `fwbench` (a script's own folder is on sys.path); tests add
eval/ to sys.path in tests/fwbench/conftest.py.
"""
