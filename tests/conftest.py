"""One torch thread per test process unless OMP_NUM_THREADS says otherwise: on a shared 2-core machine,
two threads per process were up to 30x slower (spinning threads fight other processes for the cores).
An explicit OMP_NUM_THREADS is honoured so the suite can be run with 2 threads too (float reductions,
hence the bytes compared by same-machine determinism tests, depend on the thread count; the suite must
pass with either)."""
import os

import torch

if not os.environ.get("OMP_NUM_THREADS"):
    torch.set_num_threads(1)


def pytest_report_header(config):
    return (f"torch {torch.__version__}: {torch.get_num_threads()} thread(s), "
            f"CPU kernels {torch.backends.cpu.get_cpu_capability()}")
