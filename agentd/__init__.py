"""The Workload Mirroring Agent."""

import os

# numpy (it decodes the capture's per-CPU maps) starts an OpenBLAS thread pool when imported. The agent does
# no linear algebra, and it must still have a single thread when it drops its start-up capabilities, which
# are per thread (agentd/capabilities.py).
os.environ["OPENBLAS_NUM_THREADS"] = "1"
