"""The benchmark harness (eval/ only; fwllm never imports it): the merge matrix scored with
lm-eval (`matrix`, `dev_losses`) and the full quality benchmark (`quality_bench`, `held_out`,
`quality_engine`, `quality_report`). Its engine extends fwllm's own pool-quality engine
(`fwllm.demo.pool_quality`, what `fwllm demo` runs: tuned TA, RegMean, FW, one table) with tuned
TIES/DARE, the best single expert, held-out GLUE tasks, paired differences and the long report.

eval/*.py scripts import it as `fwbench` (a script's own folder is on sys.path); tests add
eval/ to sys.path in tests/fwbench/conftest.py.
"""
