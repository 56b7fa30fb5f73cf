"""One torch thread for the whole suite: on a shared 2-core machine, two threads per process were
up to 30x slower (spinning threads fight other processes for the cores), and float reductions
(hence the bytes compared by determinism tests) depend on the thread count."""
import torch

torch.set_num_threads(1)
