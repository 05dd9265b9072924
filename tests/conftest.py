"""Test-wide settings: the tests never reach a model hub (every model and dataset is built by the tests)."""

import os

# Set before transformers / huggingface_hub are imported, so a stray hub lookup fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
