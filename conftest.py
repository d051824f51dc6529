import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter on CPU tensors. Must be set before any
# kernel module is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from tests.interpreter_patch import patch_once_per_launch

    patch_once_per_launch()

# Under pytest-xdist (the README's `-n 2`) each worker gets its share of the cores: torch's
# default of one intra-op thread per core in every worker oversubscribes them, and OpenMP's
# spin-waits then made the float64 gradchecks 5x slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def _fresh_dynamo(request):
    # Compile tests count graphs and must not inherit the recompile budget earlier tests spent.
    if request.node.get_closest_marker("compile"):
        torch._dynamo.reset()
    yield
