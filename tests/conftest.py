"""Test-wide settings: the tests never reach a model hub (every model and dataset is built by the tests), and run
torch on one thread."""

import os

# Set before transformers / huggingface_hub are imported, so a stray hub lookup fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Every model in the tests is tiny: dispatch-bound, so one intra-op thread is faster than two, and on a shared
    machine extra threads only add contention (measured 3-10x slower on 2 loaded cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
