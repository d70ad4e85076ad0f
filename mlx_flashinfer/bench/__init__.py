"""`flashinfer bench`: the paper's ablation (Tables 2 and 3) and the baselines users
would run instead, each configuration in its own memory-limited process.

- configs.py   the rows, their budgets and memory limits
- layouts.py   the bundled / unbundled pair of layouts
- cgroup.py    memory cgroups (v1 and v2) and page-cache eviction
- runner.py    a run in a limited subprocess, or inline (tests)
- worker.py    what runs inside: build the model, prefill, decode, count
- ablation.py  prepare the runs, run them, the result document
- report.py    per-token metrics, markdown tables, cross-machine comparison
- plots.py     PNGs (matplotlib optional)
The `bench` subcommand itself is `cli/bench.py`.
"""
