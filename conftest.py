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


@pytest.fixture(autouse=True)
def _fresh_dynamo(request):
    # Compile tests count graphs and must not inherit the recompile budget earlier tests spent.
    if request.node.get_closest_marker("compile"):
        torch._dynamo.reset()
    yield
