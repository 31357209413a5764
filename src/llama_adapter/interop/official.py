"""Official LLaMA-Adapter v1 `.pth` files, read and written.

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
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..adapter import _atomic_write
from ..config import AdapterConfig, Config
from ..model import LLaMA
from .common import OFFICIAL_DEFAULT_LEN, OFFICIAL_GATE, OFFICIAL_QUERY, PromptTensors, base_config, require_v1_text


def official_state(path: Path) -> dict[str, Any]:
    """The entries of an official file: the whole dict, or the adapter keys of a full training
    checkpoint (checkpoint-N.pth, whose "model" holds every weight)."""
    sd = checkpoint.load_torch_file(path)
    if isinstance(sd.get("model"), dict):
        model = sd["model"].items()
        sd = {k: v for k, v in model if isinstance(k, str) and (k == OFFICIAL_QUERY or OFFICIAL_GATE.match(k))}
    return sd


def _official_items(sd: dict[str, Any], path: Path) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
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
    checkpoint.require_tensors(sd, path, "an official adapter holds only adapter_query.weight and gate tensors")
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
    query, gates = _official_items(official_state(path), path)
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
    require_v1_text(pt.config, "the official format")
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
