"""k-nearest-neighbour search: FAISS indexes, an exact torch path, top-k merging."""

import os

# The cores this process may run on (a SLURM allocation may give fewer than the machine's).
CPU_THREADS = (
    len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
)
