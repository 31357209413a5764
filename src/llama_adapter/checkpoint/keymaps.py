"""One table per external format: their tensor names -> ours, and the q/k layout they store.

Our model uses the Hugging Face "rotate half" RoPE order, so Meta, llama2.c and GGUF q/k weights
(Meta's interleaved order) are permuted when loaded (`interleaved_to_half`).
"""

from __future__ import annotations

import re

import torch


class KeyMap:
    """Their tensor names <-> ours. Patterns use `{i}` for the layer index."""

    def __init__(self, table: dict[str, str], *, interleaved_qk: bool, ignore: tuple[str, ...] = ()) -> None:
        self.table = table
        self.interleaved_qk = interleaved_qk  # q/k stored in Meta's interleaved RoPE order
        self._fwd = [(re.compile(re.escape(k).replace(r"\{i\}", r"(\d+)") + r"\Z"), v) for k, v in table.items()]
        self._rev = [(re.compile(re.escape(v).replace(r"\{i\}", r"(\d+)") + r"\Z"), k) for k, v in table.items()]
        self._ignore = [re.compile(p) for p in ignore]

    @staticmethod
    def _apply(rules: list[tuple[re.Pattern, str]], name: str) -> str | None:
        for pat, target in rules:
            m = pat.match(name)
            if m:
                return target.replace("{i}", m.group(1)) if m.groups() else target
        return None

    def ours(self, theirs: str) -> str | None:
        return self._apply(self._fwd, theirs)

    def theirs(self, ours: str) -> str:
        name = self._apply(self._rev, ours)
        assert name is not None, ours
        return name

    def ignored(self, theirs: str) -> bool:
        return any(p.search(theirs) for p in self._ignore)


OURS_LAYER = {
    "attention_norm": "layers.{i}.attention_norm.weight",
    "wq": "layers.{i}.attention.wq.weight",
    "wk": "layers.{i}.attention.wk.weight",
    "wv": "layers.{i}.attention.wv.weight",
    "wo": "layers.{i}.attention.wo.weight",
    "ffn_norm": "layers.{i}.ffn_norm.weight",
    "w1": "layers.{i}.feed_forward.w1.weight",
    "w2": "layers.{i}.feed_forward.w2.weight",
    "w3": "layers.{i}.feed_forward.w3.weight",
}

HF_KEYS = KeyMap(
    {
        "model.embed_tokens.weight": "tok_embeddings.weight",
        "model.layers.{i}.input_layernorm.weight": OURS_LAYER["attention_norm"],
        "model.layers.{i}.self_attn.q_proj.weight": OURS_LAYER["wq"],
        "model.layers.{i}.self_attn.k_proj.weight": OURS_LAYER["wk"],
        "model.layers.{i}.self_attn.v_proj.weight": OURS_LAYER["wv"],
        "model.layers.{i}.self_attn.o_proj.weight": OURS_LAYER["wo"],
        "model.layers.{i}.post_attention_layernorm.weight": OURS_LAYER["ffn_norm"],
        "model.layers.{i}.mlp.gate_proj.weight": OURS_LAYER["w1"],
        "model.layers.{i}.mlp.down_proj.weight": OURS_LAYER["w2"],
        "model.layers.{i}.mlp.up_proj.weight": OURS_LAYER["w3"],
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight",
    },
    interleaved_qk=False,
    ignore=(r"rotary_emb\.inv_freq$",),
)

GGUF_KEYS = KeyMap(
    {
        "token_embd.weight": "tok_embeddings.weight",
        "blk.{i}.attn_norm.weight": OURS_LAYER["attention_norm"],
        "blk.{i}.attn_q.weight": OURS_LAYER["wq"],
        "blk.{i}.attn_k.weight": OURS_LAYER["wk"],
        "blk.{i}.attn_v.weight": OURS_LAYER["wv"],
        "blk.{i}.attn_output.weight": OURS_LAYER["wo"],
        "blk.{i}.ffn_norm.weight": OURS_LAYER["ffn_norm"],
        "blk.{i}.ffn_gate.weight": OURS_LAYER["w1"],
        "blk.{i}.ffn_down.weight": OURS_LAYER["w2"],
        "blk.{i}.ffn_up.weight": OURS_LAYER["w3"],
        "output_norm.weight": "norm.weight",
        "output.weight": "output.weight",
    },
    interleaved_qk=True,
    ignore=(r"^rope_freqs\.weight$",),  # Llama-3.1 frequency factors: turned into config.rope_scaling
)

# Meta names are ours; only q/k layout differs. Values: the dim model-parallel shards are split on
# (None = replicated; "auto" = embeddings, dim 1 in LLaMA 1/2 and dim 0 in Llama 3).
META_SPLIT: dict[str, int | str | None] = {
    "tok_embeddings.weight": "auto",
    "layers.{i}.attention_norm.weight": None,
    "layers.{i}.attention.wq.weight": 0,
    "layers.{i}.attention.wk.weight": 0,
    "layers.{i}.attention.wv.weight": 0,
    "layers.{i}.attention.wo.weight": 1,
    "layers.{i}.ffn_norm.weight": None,
    "layers.{i}.feed_forward.w1.weight": 0,
    "layers.{i}.feed_forward.w2.weight": 1,
    "layers.{i}.feed_forward.w3.weight": 0,
    "norm.weight": None,
    "output.weight": 0,
}
META_KEYS = KeyMap({k: k for k in META_SPLIT}, interleaved_qk=True, ignore=(r"^rope\.freqs$",))

# llama2.c legacy (version 0) export order after the 7-int header; "*" = all layers stacked.
LLAMA2C_ORDER = ("tok_embeddings", "attention_norm*", "wq*", "wk*", "wv*", "wo*", "ffn_norm*", "w1*", "w2*", "w3*",
                 "norm", "freq_cis_real", "freq_cis_imag", "output")  # fmt: skip
LLAMA2C_KEYS = KeyMap(
    {"tok_embeddings.weight": "tok_embeddings.weight", "norm.weight": "norm.weight", "output.weight": "output.weight"}
    | {v: v for v in OURS_LAYER.values()},
    interleaved_qk=True,
)


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from Meta's interleaved RoPE pairs (x0,x1),(x2,x3).. to the HF rotate-half order.

    Same as `permute` in transformers' convert_llama_weights_to_hf.py."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half` (llama.cpp's convert_hf_to_gguf `permute`)."""
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)
