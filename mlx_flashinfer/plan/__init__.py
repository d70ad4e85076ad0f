"""The cost model and the planner (the paper's sections 2-3): this machine's curves
(disk by read size and parallelism, memory bandwidth, compute per dtype: `disk.py`,
`machine.py`), a token's predicted cost under each placement (`costs.py`), and the
choice of the fastest plan a budget allows (`planner.py`)."""
