"""Interoperability: official LLaMA-Adapter v1 files, Hugging Face PEFT AdaptionPrompt adapters,
HF base-model export, adapter inspection and merging.

Every adapter format is read into one in-memory form (`PromptTensors`: prompts [L*K, dim] in
layer-major row order, raw gates [L, n_heads], an `AdapterConfig` and the base `Config`) and
written from it, so each converter is one reader plus one writer.

Official LLaMA-Adapter v1 (OpenGVLab/LLaMA-Adapter, `llama_adapter_len10_layer30_release.pth` and
`alpaca_finetuning_v1/extract_adapter_from_checkpoint.py` output): a torch state dict with
`adapter_query.weight` [L*K, dim] (an nn.Embedding) and `layers.{i}.attention.gate` [1, n_heads, 1, 1].
What the official code does with them (read at commit 8dff0a7 / 35a6103 of that repo):

* Row order: `adapter_query.weight.reshape(adapter_layer, adapter_len, dim)` and the j-th block goes
  to `self.layers[-adapter_layer:][j]` (llama/model.py `Transformer.forward`, and the same reshape in
  alpaca_finetuning_v1/llama/model.py): layer-major, lowest adapted layer first -- our
  `AdaptionPrompt.prompts` order, so rows are copied unchanged.
* Prompts go through the layer's own `wk` / `wv`, without RoPE and without the attention norm; scores
  are scaled by 1/sqrt(head_dim) and get their own softmax (the training code concatenates
  [prompt | sequence] score blocks and softmaxes each block separately; the inference code computes a
  second attention and adds it) -- our `AdaptedAttention`.
* The gate: the TRAINING code (alpaca_finetuning_v1/llama/model.py `Attention.forward`) multiplies the
  prompt softmax by `self.gate.tanh().half()`; the INFERENCE code that ships with the released weights
  (llama/model.py, used by example.py) multiplies by the raw `self.gate` (OpenGVLab/LLaMA-Adapter
  issue #39 reports the discrepancy; it was never reconciled). To reproduce the official demo outputs
  of `llama_adapter_len10_layer30_release.pth`, use `gate_activation="identity"` (our default for
  official imports); to continue the semantics the official trainer optimised, use "tanh". The two
  differ by |tanh(g) - g| <= |g|^3 / 3 per head; `read_official` reports the largest difference.
* The first public inference code (commit 91d5912, March 2023) had one scalar gate per layer
  (`torch.zeros(1)`); per-head gates [1, n_heads, 1, 1] arrived with the training code (fa65dbc).
  Both shapes are read (a scalar is broadcast to every head).
* K and L: the official example.py fixes adapter_len=10 and sets adapter_layer = rows / 10, and the
  extract script saves gates of ALL layers (`range(32)`, the untrained bottom ones stay 0), so the
  number of gate keys is not always L. `infer_official_shape` documents the rule used here.

PEFT AdaptionPrompt (peft/tuners/adaption_prompt, checked against peft 0.21.2): per adapted layer
`...model.layers.{i}.self_attn.adaption_prompt` [1, K, hidden] and `...adaption_gate` [1] for the top
`adapter_layers` layers; prompts through k_proj / v_proj (no RoPE), GQA by repeat_interleave, scores
/ sqrt(head_dim), a separate fp32 softmax, multiplied by the RAW scalar gate, then o_proj -- the
same function as ours with gate_activation="identity" and the scalar broadcast to all heads, so
PEFT -> ours is exact. Ours -> PEFT is exact only when all heads of a layer share one activated gate
(we export tanh(g) when the activation is tanh); otherwise the head mean is written, a warning says
so and the report gives the largest per-head deviation. PEFT derives its GQA factor as
hidden // (n_kv_heads * head_dim), so bases whose n_heads * head_dim != hidden cannot be exported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FORMAT_VERSION,
    AdaptedLLaMA,
    AdapterConfig,
    _atomic_write,
    read_adapter_config,
)
from .config import Config
from .model import LLaMA

OURS = "llama-adapter"
PEFT = "peft"
OFFICIAL = "official"
OFFICIAL_DEFAULT_LEN = 10  # example.py's ModelArgs.adapter_len; the released file uses it
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # what PeftModelForCausalLM.save_pretrained writes before the HF names
PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.self_attn\.adaption_(prompt|gate)$")
OFFICIAL_QUERY = "adapter_query.weight"
OFFICIAL_GATE = re.compile(r"^layers\.(\d+)\.attention\.gate$")


@dataclass
class PromptTensors:
    """One V1 prompt adapter, format-neutral."""

    prompts: torch.Tensor  # [L*K, dim], layer-major (row j*K + k: layer n-L+j, prompt k)
    gates: torch.Tensor  # [L, n_heads], raw (config.gate_activation is applied at run time)
    config: AdapterConfig
    base: Config
    notes: list[str] = field(default_factory=list)

    def activated_gates(self) -> torch.Tensor:
        return torch.tanh(self.gates) if self.config.gate_activation == "tanh" else self.gates

    @property
    def layers(self) -> list[int]:
        n = self.base.n_layers
        return list(range(n - self.config.adapter_layers, n))


# --------------------------------------------------------------------------------------------- base config
def base_config(base: Config | LLaMA | AdaptedLLaMA | str | Path) -> Config:
    """The base model's Config from a Config, a (wrapped) model or a checkpoint spec. HF and Meta
    directories are read from their JSON (and, for Meta, one memory-mapped shard's shapes) without
    loading weights; other formats are loaded with `checkpoint.load_model`."""
    if isinstance(base, Config):
        return base
    if isinstance(base, AdaptedLLaMA):
        return base.model.config
    if isinstance(base, LLaMA):
        return base.config
    from . import checkpoint

    source = checkpoint.resolve(base)
    if source.format == "hf":
        d = json.loads((source.path / "config.json").read_text(encoding="utf-8"))
        return checkpoint.config_from_hf(d, name=source.name)
    if source.format == "meta":
        return _meta_config(source.path, source.name)
    return checkpoint.load_model(base, progress=False).config


def _meta_config(d: Path, name: str) -> Config:
    """Mirror of checkpoint._load_meta's Config derivation (tests check both agree)."""
    from .checkpoint import meta_hidden_dim

    p = json.loads((d / "params.json").read_text(encoding="utf-8"))
    files = sorted(d.glob("consolidated.*.pth"))
    vocab = p.get("vocab_size", -1)
    if vocab is None or vocab <= 0:
        vocab = 0
        for f in files:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            vocab += sd["output.weight"].shape[0] if "output.weight" in sd else 0
    scaling = None
    if p.get("use_scaled_rope"):
        scaling = dict(factor=float(p.get("rope_scaling_factor", 8.0)), low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)  # fmt: skip
    theta = float(p.get("rope_theta", 10000.0))
    default_len = 131072 if scaling else (8192 if theta >= 500000 else 2048)
    return Config(
        name=name,
        dim=p["dim"],
        n_layers=p["n_layers"],
        n_heads=p["n_heads"],
        n_kv_heads=p.get("n_kv_heads") or p["n_heads"],
        vocab_size=vocab,
        hidden_dim=meta_hidden_dim(p["dim"], p.get("multiple_of", 256), p.get("ffn_dim_multiplier")),
        norm_eps=float(p.get("norm_eps", 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=int(p.get("max_seq_len", default_len)),
        tie_embeddings=False,
    )


def _base_summary(c: Config) -> dict[str, Any]:
    return {
        "name": c.name,
        "fingerprint": c.fingerprint(),
        "dim": c.dim,
        "n_layers": c.n_layers,
        "n_heads": c.n_heads,
        "n_kv_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
    }


# ------------------------------------------------------------------------------------------- format sniffing
def detect_format(path: str | Path) -> str:
    """'llama-adapter' (ours), 'peft' or 'official' for an adapter file or directory."""
    p = Path(path)
    if p.is_file():
        if p.suffix in (".pth", ".pt", ".bin"):
            return OFFICIAL
        if p.name in (ADAPTER_CONFIG, PEFT_CONFIG):
            return detect_format(p.parent)
        raise ValueError(f"{p}: not an adapter file; expected an official .pth or an adapter directory")
    if not p.is_dir():
        raise ValueError(f"{p}: no such file or directory")
    cfg = p / ADAPTER_CONFIG
    if not cfg.is_file():
        raise ValueError(
            f"{p}: not an adapter directory ({ADAPTER_CONFIG} missing); expected ours "
            f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}), PEFT ({PEFT_CONFIG} + {PEFT_WEIGHTS}) or an official .pth file"
        )
    try:
        meta = json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg} is not valid JSON ({e}); the file is damaged") from e
    if meta.get("format") == OURS:
        return OURS
    if "peft_type" in meta:
        return PEFT
    raise ValueError(f"{cfg}: neither a llama-adapter config (format='llama-adapter') nor a PEFT config (peft_type)")


# ---------------------------------------------------------------------------------------------- official
def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip archive (legacy format): no mmap
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return sd


def _official_items(sd: dict[str, Any], path: Path) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    if isinstance(sd.get("model"), dict):  # a full training checkpoint (checkpoint-N.pth): keep adapter keys
        sd = {k: v for k, v in sd["model"].items() if k == OFFICIAL_QUERY or OFFICIAL_GATE.match(k)}
    if OFFICIAL_QUERY not in sd:
        raise ValueError(
            f"{path}: no {OFFICIAL_QUERY!r}; an official LLaMA-Adapter v1 file has {OFFICIAL_QUERY} [L*K, dim] and "
            f"layers.{{i}}.attention.gate [1, n_heads, 1, 1]; found {sorted(sd)[:8]}"
        )
    gates, unknown = {}, []
    for k, v in sd.items():
        m = OFFICIAL_GATE.match(k)
        if m:
            gates[int(m.group(1))] = v
        elif k != OFFICIAL_QUERY:
            unknown.append(k)
    if unknown:
        raise ValueError(
            f"{path}: unknown tensors {unknown[:5]}{' ...' if len(unknown) > 5 else ''}; expected only "
            f"{OFFICIAL_QUERY} and layers.{{i}}.attention.gate (a V2 / multimodal official checkpoint is not V1)"
        )
    if not gates:
        raise ValueError(f"{path}: no layers.{{i}}.attention.gate tensors next to {OFFICIAL_QUERY}")
    return sd[OFFICIAL_QUERY], gates


def infer_official_shape(
    rows: int, gates: dict[int, torch.Tensor], n_layers: int, adapter_len: int | None = None
) -> tuple[int, int]:
    """(K, L) of an official file with `rows` prompt rows and gate tensors for layer indices `gates`.

    Consistent (K, L): L divides `rows`, the top L layers all have a gate, and every gate below them is
    exactly 0 (never trained). Among those, in order: the explicit `adapter_len`; L = number of gate
    keys when those are exactly the top layers and the lowest one is non-zero (the file names its
    adapted layers); K = 10 (what the official example.py assumes: adapter_layer = rows / 10);
    otherwise the only consistent choice. Anything else is an error asking for `adapter_len`."""
    top = set(range(n_layers))
    bad = sorted(set(gates) - top)
    if bad:
        raise ValueError(f"gates for layers {bad}, but the base has {n_layers} layers (0..{n_layers - 1})")

    def consistent(L: int) -> bool:
        if L < 1 or L > n_layers or rows % L:
            return False
        adapted = set(range(n_layers - L, n_layers))
        return adapted <= set(gates) and all(not bool(g.any()) for i, g in gates.items() if i not in adapted)

    if adapter_len is not None:
        if rows % adapter_len or not consistent(rows // adapter_len):
            raise ValueError(
                f"adapter_len={adapter_len} does not fit: {rows} prompt rows and gates for layers "
                f"{sorted(gates)} of {n_layers} (need L = rows / K adapted top layers, each with a gate)"
            )
        return adapter_len, rows // adapter_len
    G = len(gates)
    if sorted(gates) == list(range(n_layers - G, n_layers)) and consistent(G) and bool(gates[n_layers - G].any()):
        return rows // G, G
    if rows % OFFICIAL_DEFAULT_LEN == 0 and consistent(rows // OFFICIAL_DEFAULT_LEN):
        return OFFICIAL_DEFAULT_LEN, rows // OFFICIAL_DEFAULT_LEN
    options = [L for L in range(1, n_layers + 1) if consistent(L)]
    if len(options) == 1:
        return rows // options[0], options[0]
    raise ValueError(
        f"cannot tell adapter_len K from {rows} prompt rows and gates for layers {sorted(gates)} "
        f"(consistent K: {[rows // L for L in options] or 'none'}); pass adapter_len (--adapter-len)"
    )


def read_official(
    path: str | Path,
    base: Config | LLaMA | str | Path,
    *,
    gate_activation: str = "identity",
    adapter_len: int | None = None,
) -> PromptTensors:
    """An official LLaMA-Adapter v1 `.pth` (with its Meta-format base) -> PromptTensors.
    `gate_activation="identity"` reproduces the official inference code (what the released
    `llama_adapter_len10_layer30_release.pth` was published with); "tanh" the official trainer."""
    path = Path(path)
    if gate_activation not in ("tanh", "identity"):
        raise ValueError(f"gate_activation={gate_activation!r}: choose 'tanh' or 'identity'")
    cfg_base = base_config(base)
    query, gates = _official_items(_load_torch(path), path)
    if query.ndim != 2 or query.shape[1] != cfg_base.dim:
        raise ValueError(
            f"{path}: {OFFICIAL_QUERY} is {list(query.shape)}, expected [L*K, dim={cfg_base.dim}] for base "
            f"'{cfg_base.name}' (dim={cfg_base.dim}, n_heads={cfg_base.n_heads}, n_layers={cfg_base.n_layers}); "
            "load the base model the adapter was trained on"
        )
    H = cfg_base.n_heads
    for i, g in gates.items():
        if g.numel() not in (1, H):
            raise ValueError(
                f"{path}: layers.{i}.attention.gate is {list(g.shape)}, expected [1, n_heads={H}, 1, 1] "
                f"(or one scalar) for base '{cfg_base.name}' with {H} heads"
            )
    K, L = infer_official_shape(query.shape[0], gates, cfg_base.n_layers, adapter_len)
    n = cfg_base.n_layers
    raw = torch.stack([gates[i].float().reshape(-1).expand(H) for i in range(n - L, n)])
    notes = [f"inferred adapter_len K={K}, adapter_layers L={L} (layers {n - L}..{n - 1})"]
    if any(g.numel() == 1 for g in gates.values()):
        notes.append("scalar gates (first official release layout) broadcast to every head")
    other = "tanh" if gate_activation == "identity" else "identity"
    diff = float((torch.tanh(raw) - raw).abs().max())
    notes.append(
        f"gate_activation={gate_activation!r}; {other!r} would change the applied gates by up to {diff:.3g} "
        "(official inference code: identity; official training code: tanh)"
    )
    cfg = AdapterConfig(adapter_len=K, adapter_layers=L, gate_activation=gate_activation)
    cfg.validate(cfg_base)
    return PromptTensors(query.float().clone(), raw.clone(), cfg, cfg_base, notes)


def write_official(pt: PromptTensors, path: str | Path) -> float:
    """Write an official v1 `.pth`: gates [1, H, 1, 1] hold the ACTIVATED gates, because the official
    inference code (llama/model.py) applies the raw gate -- exact under that code. Returns 0.0."""
    _require_v1_text(pt.config, "the official format")
    n = pt.base.n_layers
    sd = {OFFICIAL_QUERY: pt.prompts.float().contiguous()}
    act = pt.activated_gates().float()
    for j, i in enumerate(pt.layers):
        sd[f"layers.{i}.attention.gate"] = act[j].reshape(1, -1, 1, 1).clone()
    if pt.config.adapter_len != OFFICIAL_DEFAULT_LEN:
        warnings.warn(
            f"adapter_len={pt.config.adapter_len}: the official example.py assumes {OFFICIAL_DEFAULT_LEN} "
            "(it sets adapter_layer = rows / 10); set ModelArgs.adapter_len there",
            stacklevel=2,
        )
    if pt.base.n_kv_heads != pt.base.n_heads:
        warnings.warn("the official v1 code is multi-head only (LLaMA-1); this base uses GQA", stacklevel=2)
    assert len(pt.layers) == pt.config.adapter_layers <= n
    _atomic_write(Path(path), lambda p: torch.save(sd, p))
    return 0.0


# -------------------------------------------------------------------------------------------------- PEFT
def _peft_tensors(d: Path) -> dict[str, torch.Tensor]:
    if (d / PEFT_WEIGHTS).is_file():
        return load_file(d / PEFT_WEIGHTS)
    if (d / PEFT_WEIGHTS_BIN).is_file():
        return _load_torch(d / PEFT_WEIGHTS_BIN)
    raise ValueError(f"{d}: neither {PEFT_WEIGHTS} nor {PEFT_WEIGHTS_BIN} found next to {PEFT_CONFIG}")


def read_peft(adapter_dir: str | Path, base: Config | LLaMA | str | Path | None = None) -> PromptTensors:
    """A PEFT AdaptionPrompt directory -> PromptTensors (gate_activation="identity", the scalar gate
    broadcast to all heads: exact). `base` defaults to the config's `base_model_name_or_path` when
    that is a local checkpoint."""
    d = Path(adapter_dir)
    cfg_path = d / PEFT_CONFIG
    if not cfg_path.is_file():
        raise ValueError(f"{d}: {PEFT_CONFIG} missing; not a PEFT adapter directory")
    pc = json.loads(cfg_path.read_text(encoding="utf-8"))
    ptype = pc.get("peft_type")
    if ptype != "ADAPTION_PROMPT":
        raise ValueError(
            f"{cfg_path}: peft_type={ptype!r}; only ADAPTION_PROMPT (LLaMA-Adapter) adapters convert "
            "(LoRA and other PEFT methods change base weights differently)"
        )
    base_name = pc.get("base_model_name_or_path")
    target = pc.get("target_modules")
    if target not in (None, "self_attn"):
        raise ValueError(
            f"{cfg_path}: target_modules={target!r} (base {base_name!r}) is not a Llama attention; expected "
            "'self_attn' (LlamaForCausalLM). Adapters for GPT-2 ('attn') or other architectures do not convert"
        )
    sd = _peft_tensors(d)
    prompts: dict[int, torch.Tensor] = {}
    gates: dict[int, torch.Tensor] = {}
    unknown = []
    for k, v in sd.items():
        m = PEFT_KEY.match(k)
        if not m:
            unknown.append(k)
        else:
            (prompts if m.group(2) == "prompt" else gates)[int(m.group(1))] = v
    if unknown:
        raise ValueError(
            f"{d}: tensors {unknown[:4]}{' ...' if len(unknown) > 4 else ''} are not Llama adaption prompts; "
            f"expected {PEFT_PREFIX}model.layers.{{i}}.self_attn.adaption_prompt [1, K, hidden] and "
            f"...adaption_gate [1] (base {base_name!r} is not a Llama model?)"
        )
    if not prompts or set(prompts) != set(gates):
        raise ValueError(
            f"{d}: adaption_prompt layers {sorted(prompts)} and adaption_gate layers {sorted(gates)} differ"
        )
    if base is None:
        if base_name and Path(base_name).expanduser().exists():
            base = base_name
        else:
            raise ValueError(
                f"{d}: base_model_name_or_path={base_name!r} is not a local checkpoint; pass the base "
                "model (--base PATH) so widths and layer counts can be checked"
            )
    cfg_base = base_config(base)
    n, dim, H = cfg_base.n_layers, cfg_base.dim, cfg_base.n_heads
    L = len(prompts)
    K = next(iter(prompts.values())).shape[-2]
    want_layers = list(range(n - L, n))
    expected = (
        f"expected for base '{cfg_base.name}' (dim={dim}, n_layers={n}, n_heads={H}): "
        f"model.layers.{{{n - L}..{n - 1}}}.self_attn.adaption_prompt [1, K, {dim}] and adaption_gate [1]"
    )
    if sorted(prompts) != want_layers:
        raise ValueError(f"{d}: adapted layers {sorted(prompts)} are not the top {L} of {n}; {expected}")
    for i in want_layers:
        p, g = prompts[i], gates[i]
        if p.ndim != 3 or p.shape[0] != 1 or p.shape[1] != K or p.shape[2] != dim:
            raise ValueError(f"{d}: layer {i} adaption_prompt is {list(p.shape)}; {expected}")
        if g.numel() != 1:
            raise ValueError(f"{d}: layer {i} adaption_gate is {list(g.shape)}; {expected}")
    for key, have in (("adapter_len", K), ("adapter_layers", L)):
        if pc.get(key) not in (None, have):
            raise ValueError(f"{cfg_path}: {key}={pc.get(key)} but the tensors have {key}={have}")
    cfg = AdapterConfig(adapter_len=K, adapter_layers=L, gate_activation="identity")
    cfg.validate(cfg_base)
    P = torch.cat([prompts[i][0].float() for i in want_layers])
    G = torch.stack([gates[i].float().reshape(1).expand(H) for i in want_layers])
    return PromptTensors(P, G.clone(), cfg, cfg_base, ["PEFT scalar gates -> identity gates on every head (exact)"])


def write_peft(
    pt: PromptTensors,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    strict: bool = False,
) -> float:
    """Write `adapter_config.json` + `adapter_model.safetensors` loadable by `PeftModel.from_pretrained`
    on the matching LlamaForCausalLM. Returns the largest |activated gate - written gate| over heads
    (0.0 = exact); non-zero warns, or raises with `strict`."""
    _require_v1_text(pt.config, "PEFT")
    c = pt.base
    if c.n_heads * c.head_dim != c.dim:
        raise ValueError(
            f"base '{c.name}' has n_heads*head_dim={c.n_heads * c.head_dim} != hidden={c.dim}; PEFT's adaption "
            "prompt derives its GQA factor from hidden // (n_kv_heads*head_dim) and cannot run this base"
        )
    act = pt.activated_gates().float()
    scalar = act.mean(dim=1)
    dev = float((act - scalar[:, None]).abs().max())
    if dev > 0:
        msg = (
            f"PEFT has one gate per layer; this adapter's heads differ (activated gates), so the head mean is "
            f"written: largest per-head deviation {dev:.3g}. The export is approximate"
        )
        if strict:
            raise ValueError(msg + "; drop strict to accept it")
        warnings.warn(msg, stacklevel=2)
    K = pt.config.adapter_len
    tensors = {}
    for j, i in enumerate(pt.layers):
        tensors[f"{PEFT_PREFIX}model.layers.{i}.self_attn.adaption_prompt"] = (
            pt.prompts[j * K : (j + 1) * K].float()[None].contiguous()
        )
        tensors[f"{PEFT_PREFIX}model.layers.{i}.self_attn.adaption_gate"] = scalar[j].reshape(1).clone()
    config = {
        "adapter_layers": pt.config.adapter_layers,
        "adapter_len": K,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path or c.extra.get("source") or c.name,
        "inference_mode": True,
        "peft_type": "ADAPTION_PROMPT",
        "revision": None,
        "target_modules": "self_attn",
        "task_type": "CAUSAL_LM",
    }
    out = Path(out_dir)
    _atomic_write(out / PEFT_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(out / PEFT_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    return dev


# -------------------------------------------------------------------------------------------------- ours
def _require_v1_text(cfg: AdapterConfig, target: str) -> None:
    extra = [f for f in ("visual_dim", "bias_scale", "train_norms", "bind_dim") if getattr(cfg, f, 0)]
    if extra:
        raise ValueError(
            f"{target} holds only text prompts and gates, but this adapter also uses {', '.join(extra)} "
            "(multimodal projection / LLaMA-Adapter V2 / bind network); these cannot be converted"
        )


def read_ours(adapter_dir: str | Path) -> PromptTensors:
    meta = read_adapter_config(adapter_dir)
    cfg = AdapterConfig.from_dict(meta["adapter"])
    base = Config.from_dict(meta["base"]["config"])
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ValueError(f"adapter weights {path} not found")
    sd = load_file(path)
    _require_v1_text(cfg, "this conversion")
    for key in ("adapter.prompts", "adapter.gates"):
        if key not in sd:
            raise ValueError(f"{path}: missing tensor {key!r}; the file has {sorted(sd)}")
    return PromptTensors(sd["adapter.prompts"].float(), sd["adapter.gates"].float(), cfg, base)


def write_ours(pt: PromptTensors, out_dir: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """The same files `adapter.save_adapter` writes (loadable by `load_adapter` and `AdapterBank.add`)."""
    out = Path(out_dir)
    c, cfg = pt.base, pt.config
    L, K = cfg.adapter_layers, cfg.adapter_len
    if tuple(pt.prompts.shape) != (L * K, c.dim) or tuple(pt.gates.shape) != (L, c.n_heads):
        raise ValueError(f"prompts {list(pt.prompts.shape)} / gates {list(pt.gates.shape)} do not fit K={K}, L={L}")
    tensors = {"adapter.prompts": pt.prompts.float().contiguous(), "adapter.gates": pt.gates.float().contiguous()}
    meta = {
        "format": OURS,
        "format_version": FORMAT_VERSION,
        "adapter": cfg.to_dict(),
        "base": {"name": c.name, "fingerprint": c.fingerprint(), "config": c.to_dict()},
        "dtype": "float32",
        "trainable_parameters": sum(t.numel() for t in tensors.values()),
        **(metadata or {}),
    }
    _atomic_write(out / ADAPTER_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(out / ADAPTER_CONFIG, lambda p: Path(p).write_text(json.dumps(meta, indent=2, default=str)))
    return out


# ---------------------------------------------------------------------------------------------- convert
def read_any(
    src: str | Path,
    base: Config | LLaMA | str | Path | None = None,
    *,
    gate_activation: str | None = None,
    adapter_len: int | None = None,
) -> tuple[str, PromptTensors]:
    fmt = detect_format(src)
    if fmt == OFFICIAL:
        if base is None:
            raise ValueError(f"{src}: an official adapter file records no base; pass the Meta base model (--base)")
        return fmt, read_official(src, base, gate_activation=gate_activation or "identity", adapter_len=adapter_len)
    if gate_activation is not None and fmt == PEFT and gate_activation != "identity":
        raise ValueError("PEFT applies its gate without tanh; a PEFT import is always gate_activation='identity'")
    pt = read_peft(src, base) if fmt == PEFT else read_ours(src)
    if fmt == OURS and base is not None:
        from .adapter import check_compatible

        check_compatible({"base": {"config": pt.base.to_dict()}}, base_config(base), where=str(src))
    return fmt, pt


def convert_adapter(
    src: str | Path,
    dst: str | Path,
    to: str = "ours",
    *,
    base: Config | LLaMA | str | Path | None = None,
    gate_activation: str | None = None,
    adapter_len: int | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Convert an adapter between ours ('ours' / 'llama-adapter'), PEFT ('peft') and the official v1
    '.pth' ('official'). `base` (a checkpoint path, Config or model) is needed for official files and for
    PEFT adapters whose base_model_name_or_path is not local. Returns a report: formats, exactness,
    the largest gate deviation and notes."""
    to = OURS if to in ("ours", OURS) else to
    if to not in (OURS, PEFT, OFFICIAL):
        raise ValueError(f"to={to!r}: choose 'ours', 'peft' or 'official'")
    fmt, pt = read_any(src, base, gate_activation=gate_activation, adapter_len=adapter_len)
    dev = 0.0
    if to == OURS:
        write_ours(pt, dst, {"converted_from": {"format": fmt, "path": str(src)}})
    elif to == PEFT:
        dev = write_peft(pt, dst, strict=strict)
    else:
        dev = write_official(pt, dst)
    notes = list(pt.notes)
    if to == PEFT and dev:
        notes.append(f"per-head gates averaged per layer (max deviation {dev:.3g})")
    return {
        "source": str(src),
        "from": fmt,
        "out": str(dst),
        "to": to,
        "exact": dev == 0.0,
        "max_gate_deviation": dev,
        "adapter_len": pt.config.adapter_len,
        "adapter_layers": pt.config.adapter_layers,
        "gate_activation": pt.config.gate_activation,
        "base": _base_summary(pt.base),
        "notes": notes,
    }


def convert_base(
    src: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32, shard_size: int | str = "5GB"
) -> dict[str, Any]:
    """Any base checkpoint `checkpoint.load_model` reads (Meta, HF, llama2.c, GGUF, named) -> a Hugging
    Face directory (config.json + safetensors, LlamaForCausalLM layout) via `checkpoint.save_hf`.
    Tokenizer files are copied when the source has HF tokenizer JSONs or a SentencePiece
    `tokenizer.model`; llama2.c / GGUF tokenizers are not exported (noted in the report)."""
    from . import checkpoint

    source = checkpoint.resolve(src)
    model = checkpoint.load_model(src, dtype=dtype)
    out = Path(out_dir)
    checkpoint.save_hf(model, out, shard_size=shard_size)
    copied, notes = [], []
    tok = source.tokenizer
    if tok is not None and tok.is_dir():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
            if (tok / name).is_file():
                shutil.copy2(tok / name, out / name)
                copied.append(name)
    elif tok is not None and tok.suffix == ".model":
        shutil.copy2(tok, out / "tokenizer.model")
        copied.append("tokenizer.model")
    else:
        notes.append(f"tokenizer not exported (source format {source.format}); copy or convert it separately")
    if source.format in ("gguf",) and any(q in source.path.name.upper() for q in ("Q4", "Q5", "Q8", "Q2", "Q3", "Q6")):
        notes.append("the source is quantised: the export holds its dequantised weights, not the original ones")
    return {
        "source": str(source.path),
        "format": source.format,
        "out": str(out),
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer_files": copied,
        "base": _base_summary(model.config),
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------------- inspect
def _shapes(path: Path) -> dict[str, dict[str, Any]]:
    if path.suffix == ".safetensors":
        out = {}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = {"shape": list(sl.get_shape()), "dtype": str(sl.get_dtype())}
        return out
    sd = _load_torch(path)
    if isinstance(sd.get("model"), dict):
        sd = {k: v for k, v in sd["model"].items() if k == OFFICIAL_QUERY or OFFICIAL_GATE.match(k)}
    return {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        for k, v in sd.items()
        if isinstance(v, torch.Tensor)
    }


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """Config, tensor names/shapes, size on disk, trainable parameter count and the base the adapter
    needs (name, fingerprint where recorded, dims) of an adapter in any supported format."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt == OFFICIAL:
        files = [p]
    else:
        files = [p / ADAPTER_CONFIG] + [
            p / n for n in (ADAPTER_WEIGHTS, PEFT_WEIGHTS, PEFT_WEIGHTS_BIN) if (p / n).is_file()
        ]
    weights = [f for f in files if f.suffix != ".json"]
    if not weights:
        raise ValueError(f"{p}: adapter weights missing (expected {ADAPTER_WEIGHTS} or {PEFT_WEIGHTS})")
    tensors = _shapes(weights[0])
    n_params = sum(math.prod(t["shape"]) for t in tensors.values())
    info: dict[str, Any] = {
        "path": str(p),
        "format": fmt,
        "size_bytes": sum(f.stat().st_size for f in files),
        "trainable_parameters": n_params,
        "tensors": tensors,
    }
    if fmt == OURS:
        meta = read_adapter_config(p)
        base = Config.from_dict(meta["base"]["config"])
        info["config"] = meta["adapter"]
        info["base"] = {**_base_summary(base), "fingerprint": meta["base"].get("fingerprint", base.fingerprint())}
        info["metadata"] = {k: v for k, v in meta.items() if k not in ("adapter", "base")}
    elif fmt == PEFT:
        pc = json.loads((p / PEFT_CONFIG).read_text(encoding="utf-8"))
        layers = sorted(int(m.group(1)) for k in tensors if (m := PEFT_KEY.match(k)) and m.group(2) == "prompt")
        width = next((t["shape"][-1] for k, t in tensors.items() if k.endswith("adaption_prompt")), None)
        info["config"] = pc
        info["base"] = {
            "name": pc.get("base_model_name_or_path"),
            "fingerprint": None,
            "dim": width,
            "min_layers": (layers[-1] + 1) if layers else None,
            "adapted_layers": layers,
            "model_type": "llama" if pc.get("target_modules") in (None, "self_attn") else "not llama",
        }
    else:
        query = tensors.get(OFFICIAL_QUERY)
        gates = {int(m.group(1)): t for k, t in tensors.items() if (m := OFFICIAL_GATE.match(k))}
        heads = {math.prod(t["shape"]) for t in gates.values()}
        rows = query["shape"][0] if query else 0
        K = OFFICIAL_DEFAULT_LEN if rows % OFFICIAL_DEFAULT_LEN == 0 else None
        info["config"] = {
            "adapter_len": K,
            "adapter_layers": rows // K if K else None,
            "note": "K assumed 10 as the official example.py does; convert checks the split against a base",
            "gate_layers": sorted(gates),
        }
        info["base"] = {
            "name": "LLaMA (Meta format)",
            "fingerprint": None,
            "dim": query["shape"][1] if query else None,
            "n_heads": max(heads) if heads else None,
            "min_layers": (max(gates) + 1) if gates else None,
        }
    return info


def list_adapters(root: str | Path) -> list[dict[str, Any]]:
    """`inspect_adapter` of every adapter in `root` (itself, its sub-directories and official .pth files),
    sorted by name; entries that fail to read are listed with an "error" instead of stopping the scan."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    candidates = [root] if (root / ADAPTER_CONFIG).is_file() else []
    for child in sorted(root.iterdir()):
        if (child.is_dir() and (child / ADAPTER_CONFIG).is_file()) or (child.is_file() and child.suffix == ".pth"):
            candidates.append(child)
    out = []
    for c in candidates:
        try:
            out.append({"name": c.name, **inspect_adapter(c)})
        except (ValueError, RuntimeError, OSError) as e:
            out.append({"name": c.name, "path": str(c), "error": str(e)})
    return out


# ------------------------------------------------------------------------------------------------ merge
def merge_adapter(model: AdaptedLLaMA, *, allow_bias: bool = False) -> dict[str, torch.Tensor]:
    """Fold what can be folded into base weights; returns a plain-LLaMA state dict (our names).

    Prompt adapters (V1 prompts + gates) cannot be merged: they add attention over K extra keys per
    adapted layer with their own softmax, which no change of W_q/W_k/W_v/W_o reproduces for every
    input. A ValueError says so. LLaMA-Adapter V2 bias/scale and trained norms fold exactly
    (`merge_bias_scale`); its prompts then stay a separate (V1) adapter, with a warning."""
    cfg = model.adapter_config
    if not (getattr(cfg, "bias_scale", False) or getattr(cfg, "train_norms", False)):
        raise ValueError(
            "prompt adapters cannot be merged into base weights: they add attention over extra prompt "
            "keys/values (a separate softmax per adapted layer), which no weight change reproduces; keep "
            "the adapter separate (load it with --adapter) or export it to PEFT with `llama-adapter convert`"
        )
    sd = merge_bias_scale(model, allow_bias=allow_bias)
    if bool(model.adapter.activated_gates().detach().abs().max() > 0) or model.adapter_visual is not None:
        warnings.warn(
            "only V2 bias/scale/norms were merged; the adaption prompts (non-zero gates) still apply: load "
            "them as an adapter on the merged base (see export_merged(prompts_out=...))",
            stacklevel=2,
        )
    return sd


def merge_bias_scale(model: AdaptedLLaMA, *, allow_bias: bool = False) -> dict[str, torch.Tensor]:
    """LLaMA-Adapter V2 bias/scale (and trained norm) folding: W' = scale * W, b' = scale * b."""
    cfg = model.adapter_config
    if not all(hasattr(cfg, f) for f in ("bias_scale", "train_norms")):
        raise NotImplementedError("V2 bias/scale folding needs AdapterConfig.bias_scale/train_norms (V2)")
    if not (cfg.bias_scale or cfg.train_norms):
        raise ValueError("this adapter has no V2 bias/scale or trained norms to fold (bias_scale and train_norms off)")
    from . import v2

    return v2.fold_bias_scale(model.model, allow_bias=allow_bias)


def export_merged(model: AdaptedLLaMA, out_dir: str | Path, *, prompts_out: str | Path | None = None) -> Path:
    """A V2 adapter's bias/scale/norms folded into an HF base directory (`checkpoint.save_hf`);
    `prompts_out` also writes the remaining text prompts as a V1 adapter for that merged base."""
    from . import checkpoint, v2

    sd = merge_adapter(model)
    merged = v2.folded_llama(model.config, sd)
    checkpoint.save_hf(merged, out_dir)
    if prompts_out is not None:
        cfg = model.adapter_config
        if cfg.visual_dim or cfg.bind_dim:
            raise ValueError("the remaining adapter has a visual projection / bind network; only text prompts export")
        v1 = dataclasses.replace(cfg, bias_scale=False, train_norms=False)
        pt = PromptTensors(
            model.adapter.prompts.detach().float(), model.adapter.gates.detach().float(), v1, model.config
        )
        write_ours(pt, prompts_out, {"merged_base": str(out_dir)})
    return Path(out_dir)
