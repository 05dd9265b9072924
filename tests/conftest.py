"""Test-wide settings and shared fixtures: the tests never reach a model hub (every model and dataset is built by the
tests), and run torch on one thread.

pytest's default ``prepend`` import mode puts this file's folder, ``tests/``, on ``sys.path``, so test modules in the
tier folders (``kernels/``, ``trainers/``, ``engines/``) import the plain helpers as ``from support import ...`` and
the tiny models as ``from enumerable import ...``; the fixtures are here. Test basenames must stay unique across
``tests/`` (each test module is imported by its basename)."""

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


@pytest.fixture(scope="module")
def lm_paths(tmp_path_factory):
    """Three word-level GPT-2s saved to disk (``support.build_lm``): the policy, another with the same tokenizer and
    different weights, and one with a smaller vocabulary; built once per test module."""
    from support import WORDS, build_lm  # imported here: the vLLM tier shares this conftest, not these helpers

    root = tmp_path_factory.mktemp("rloo_lms")
    return {
        "policy": build_lm(root / "policy", seed=0),
        "other": build_lm(root / "other", seed=1),  # same tokenizer, different weights
        "small_vocab": build_lm(root / "small_vocab", seed=2, words=WORDS[:40]),
    }
