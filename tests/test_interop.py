"""Interop: official LLaMA-Adapter v1 files, PEFT AdaptionPrompt, several adapters on one base,
inspection, merging and HF base export."""

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import STORIES, fuzz_file, fuzz_json, tiny_llama
from safetensors.torch import save_file

from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig, load_adapter, save_adapter
from llama_adapter.checkpoint import load_model
from llama_adapter.generate import SamplingParams, generate
from llama_adapter.interop import (
    base_config,
    convert_adapter,
    convert_base,
    detect_format,
    infer_official_shape,
    inspect_adapter,
    list_adapters,
    merge_adapter,
    merge_bias_scale,
    read_official,
    read_ours,
    read_peft,
)
from llama_adapter.model import LLaMA
from llama_adapter.tokenizer import load_tokenizer

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ official v1
def make_meta_base(d, dim=32, n_layers=4, n_heads=4, vocab=64, multiple_of=16, seed=0):
    """A tiny Meta-layout (interleaved q/k) LLaMA-1 checkpoint: params.json + consolidated.00.pth."""
    g = torch.Generator().manual_seed(seed)
    hidden = multiple_of * ((int(2 * 4 * dim / 3) + multiple_of - 1) // multiple_of)  # official FeedForward

    def r(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    sd = {"tok_embeddings.weight": r(vocab, dim, std=1.0), "norm.weight": 1 + r(dim), "output.weight": r(vocab, dim)}
    for i in range(n_layers):
        p = f"layers.{i}."
        for n in ("wq", "wk", "wv", "wo"):
            sd[p + f"attention.{n}.weight"] = r(dim, dim, std=dim**-0.5)
        sd[p + "feed_forward.w1.weight"] = r(hidden, dim, std=dim**-0.5)
        sd[p + "feed_forward.w3.weight"] = r(hidden, dim, std=dim**-0.5)
        sd[p + "feed_forward.w2.weight"] = r(dim, hidden, std=hidden**-0.5)
        sd[p + "attention_norm.weight"] = 1 + r(dim)
        sd[p + "ffn_norm.weight"] = 1 + r(dim)
    d.mkdir(parents=True, exist_ok=True)
    params = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, multiple_of=multiple_of, norm_eps=1e-6, vocab_size=-1)
    (d / "params.json").write_text(json.dumps(params))
    torch.save(sd, d / "consolidated.00.pth")
    return sd, params


def make_official_adapter(path, *, n_layers=4, L=2, K=10, dim=32, n_heads=4, all_gates=False, scalar=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    sd = {"adapter_query.weight": torch.randn(L * K, dim, generator=g)}  # nn.Embedding init, N(0, 1)
    for i in range(0 if all_gates else n_layers - L, n_layers):
        shape = (1,) if scalar else (1, n_heads, 1, 1)
        gate = (torch.rand(shape, generator=g) * 3 - 1.5) if i >= n_layers - L else torch.zeros(shape)
        sd[f"layers.{i}.attention.gate"] = gate
    torch.save(sd, path)
    return sd


def official_forward(sd, params, adapter, idx, gate_activation, L=2):
    """Independent re-implementation of the official forward (alpaca_finetuning_v1/llama/model.py):
    Meta interleaved weights, complex RoPE, [prompt | sequence] scores concatenated, each block
    softmaxed separately, the prompt block scaled by act(gate) per head, prompts unrotated."""
    dim, H, n = params["dim"], params["n_heads"], params["n_layers"]
    hd, eps = dim // H, params["norm_eps"]
    query = adapter["adapter_query.weight"]
    B, T = idx.shape
    K = query.shape[0] // L
    prompts = query.reshape(L, K, dim)
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def rot(x):  # [B, T, H, hd]
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * cis[None, :, None]).flatten(3)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    mask = torch.full((T, T), float("-inf")).triu(1)
    h = sd["tok_embeddings.weight"][idx]
    for i in range(n):
        p = f"layers.{i}."
        x = rms(h, sd[p + "attention_norm.weight"])
        wq, wk, wv = (sd[p + f"attention.{w}.weight"] for w in ("wq", "wk", "wv"))
        q = rot((x @ wq.T).view(B, T, H, hd)).transpose(1, 2)
        k = rot((x @ wk.T).view(B, T, H, hd)).transpose(1, 2)
        v = (x @ wv.T).view(B, T, H, hd).transpose(1, 2)
        j = i - (n - L)
        if j >= 0:
            a = prompts[j]
            ak = (a @ wk.T).view(1, K, H, hd).transpose(1, 2).expand(B, -1, -1, -1)
            av = (a @ wv.T).view(1, K, H, hd).transpose(1, 2).expand(B, -1, -1, -1)
            keys, vals = torch.cat([ak, k], 2), torch.cat([av, v], 2)
            scores = q @ keys.transpose(2, 3) / math.sqrt(hd) + torch.cat([torch.zeros(T, K), mask], 1)
            gate = adapter[p + "attention.gate"].reshape(1, -1, 1, 1).expand(1, H, 1, 1)
            gate = gate.tanh() if gate_activation == "tanh" else gate
            probs = torch.cat([gate * F.softmax(scores[..., :K], -1), F.softmax(scores[..., K:], -1)], -1)
            o = probs @ vals
        else:
            o = F.softmax(q @ k.transpose(2, 3) / math.sqrt(hd) + mask, -1) @ v
        h = h + o.transpose(1, 2).reshape(B, T, dim) @ sd[p + "attention.wo.weight"].T
        x = rms(h, sd[p + "ffn_norm.weight"])
        ff = F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T)
        h = h + ff @ sd[p + "feed_forward.w2.weight"].T
    return rms(h, sd["norm.weight"]) @ sd["output.weight"].T


@pytest.fixture(scope="module")
def meta_base(tmp_path_factory):
    d = tmp_path_factory.mktemp("meta") / "tiny-llama"
    sd, params = make_meta_base(d)
    return d, sd, params


@pytest.mark.parametrize("gate_activation", ["identity", "tanh"])
@pytest.mark.parametrize("layout", ["top", "all_gates", "scalar"])
def test_official_matches_reference_forward(meta_base, tmp_path, gate_activation, layout):
    d, sd, params = meta_base
    pth = tmp_path / "llama_adapter_len10_layer2_release.pth"
    adapter = make_official_adapter(pth, all_gates=layout == "all_gates", scalar=layout == "scalar")
    report = convert_adapter(pth, tmp_path / "ours", to="ours", base=d, gate_activation=gate_activation)
    assert (report["adapter_len"], report["adapter_layers"], report["exact"]) == (10, 2, True)
    base = load_model(d, progress=False)
    model = load_adapter(base, tmp_path / "ours")
    idx = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(idx)
    ref = official_forward(sd, params, adapter, idx, gate_activation)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)
    # the activation matters for these gates: the other choice gives different logits
    other = official_forward(sd, params, adapter, idx, "tanh" if gate_activation == "identity" else "identity")
    assert (other - ref).abs().max() > 1e-3


def test_official_shape_inference_and_errors(meta_base, tmp_path):
    d, _, _ = meta_base
    z, nz = torch.zeros(1, 4, 1, 1), torch.ones(1, 4, 1, 1)
    assert infer_official_shape(20, {2: nz, 3: nz}, 4) == (10, 2)
    assert infer_official_shape(12, {1: nz, 2: nz, 3: nz}, 4) == (4, 3)  # L = gate keys
    assert infer_official_shape(20, {0: z, 1: z, 2: nz, 3: nz}, 4) == (10, 2)  # extract script: all layers
    assert infer_official_shape(8, {0: z, 1: z, 2: nz, 3: nz}, 4, adapter_len=4) == (4, 2)
    with pytest.raises(ValueError, match="adapter_len"):
        infer_official_shape(12, {0: nz, 1: nz, 2: nz, 3: nz}, 4, adapter_len=5)
    # a base with other widths / heads: errors name what was expected
    pth = tmp_path / "wide.pth"
    make_official_adapter(pth, dim=48)
    with pytest.raises(ValueError, match=r"expected \[L\*K, dim=32\]"):
        convert_adapter(pth, tmp_path / "x", base=d)
    make_official_adapter(pth, n_heads=8)
    with pytest.raises(ValueError, match=r"n_heads=4"):
        convert_adapter(pth, tmp_path / "x", base=d)
    torch.save({"adapter_query.weight": torch.zeros(20, 32), "layers.3.attention.gate": nz, "foo.bar": z}, pth)
    with pytest.raises(ValueError, match="unknown tensors"):
        convert_adapter(pth, tmp_path / "x", base=d)
    with pytest.raises(ValueError, match="records no base"):
        convert_adapter(pth, tmp_path / "x")
    # a full official training checkpoint ({"model": state dict}) keeps only the adapter tensors
    full = {"model": {**make_official_adapter(pth), "layers.0.attention.wq.weight": torch.zeros(32, 32)}}
    torch.save(full, pth)
    assert convert_adapter(pth, tmp_path / "x", base=d)["adapter_layers"] == 2
    # our light config reader agrees with the full loader
    assert base_config(d).fingerprint() == load_model(d, progress=False).config.fingerprint()


def test_export_official_is_exact_under_official_inference(meta_base, tmp_path):
    d, sd, params = meta_base
    pth = tmp_path / "a.pth"
    make_official_adapter(pth)
    convert_adapter(pth, tmp_path / "ours", base=d, gate_activation="tanh")
    convert_adapter(tmp_path / "ours", tmp_path / "back.pth", to="official")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    idx = torch.randint(0, 64, (1, 6))
    # exported gates are tanh(g): the official inference code (raw gate) reproduces our tanh model
    ref_tanh = official_forward(sd, params, torch.load(pth, weights_only=True), idx, "tanh")
    torch.testing.assert_close(official_forward(sd, params, back, idx, "identity"), ref_tanh, atol=2e-5, rtol=1e-5)


def test_convert_base_meta_to_hf(meta_base, tmp_path):
    d, _, _ = meta_base
    report = convert_base(d, tmp_path / "hf")
    assert report["format"] == "meta" and (tmp_path / "hf" / "config.json").is_file()
    a, b = load_model(d, progress=False), load_model(tmp_path / "hf", progress=False)
    idx = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(a(idx), b(idx), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ PEFT
def random_adapter(base, *, L=2, K=3, act="tanh", per_head=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    ad = AdaptedLLaMA(base, AdapterConfig(adapter_len=K, adapter_layers=L, gate_activation=act))
    with torch.no_grad():
        ad.adapter.prompts.copy_(torch.randn(ad.adapter.prompts.shape, generator=g))
        gates = torch.rand(ad.adapter.gates.shape, generator=g) * 2 - 1
        if not per_head:
            gates = gates[:, :1].expand_as(gates)
        ad.adapter.gates.copy_(gates)
    return ad.eval()


def test_ours_peft_ours_round_trip(tmp_path):
    base = tiny_llama(std=0.1, frozen=True)
    ad = random_adapter(base, per_head=False)
    save_adapter(ad, tmp_path / "ours")
    idx = torch.randint(0, 61, (2, 6))
    with torch.no_grad():
        want = ad(idx)
    ad.detach_base()
    r1 = convert_adapter(tmp_path / "ours", tmp_path / "peft", to="peft")
    assert r1["exact"] and r1["max_gate_deviation"] == 0.0
    with pytest.raises(ValueError, match="without tanh"):
        convert_adapter(tmp_path / "peft", tmp_path / "back", base=base, gate_activation="tanh")
    r2 = convert_adapter(tmp_path / "peft", tmp_path / "back", to="ours", base=base)
    assert r2["gate_activation"] == "identity" and r2["exact"]
    a, b = read_ours(tmp_path / "ours"), read_ours(tmp_path / "back")
    assert torch.equal(a.prompts, b.prompts)
    torch.testing.assert_close(a.activated_gates(), b.activated_gates(), atol=1e-7, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(base, tmp_path / "back")(idx), want, atol=1e-6, rtol=1e-6)


def test_peft_export_per_head_gates_is_approximate(tmp_path):
    base = tiny_llama(std=0.1, frozen=True)
    ad = random_adapter(base, per_head=True)
    save_adapter(ad, tmp_path / "ours")
    act = torch.tanh(ad.adapter.gates.detach())
    dev = float((act - act.mean(1, keepdim=True)).abs().max())
    with pytest.warns(UserWarning, match="approximate"):
        r = convert_adapter(tmp_path / "ours", tmp_path / "peft", to="peft")
    assert not r["exact"] and r["max_gate_deviation"] == pytest.approx(dev)
    with pytest.raises(ValueError, match="per-head deviation"):
        convert_adapter(tmp_path / "ours", tmp_path / "peft2", to="peft", strict=True)


def _peft_dir(d, keys, config):
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps(config))
    return d


def test_peft_bad_input_errors(tmp_path):
    base = tiny_llama(std=0.1, frozen=True)
    cfg = {"peft_type": "ADAPTION_PROMPT", "adapter_len": 3, "adapter_layers": 2, "target_modules": "attn",
           "base_model_name_or_path": "gpt2"}  # fmt: skip
    gpt2 = _peft_dir(tmp_path / "gpt2", {"base_model.model.transformer.h.11.attn.adaption_prompt": (1, 3, 32)}, cfg)
    with pytest.raises(ValueError, match="not a Llama attention"):
        convert_adapter(gpt2, tmp_path / "x", base=base)
    cfg["target_modules"] = "self_attn"
    (gpt2 / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not Llama adaption prompts"):
        convert_adapter(gpt2, tmp_path / "x", base=base)
    lora = _peft_dir(tmp_path / "lora", {}, {"peft_type": "LORA"})
    with pytest.raises(ValueError, match="only ADAPTION_PROMPT"):
        convert_adapter(lora, tmp_path / "x", base=base)
    keys = {f"base_model.model.model.layers.{i}.self_attn.adaption_{n}": s
            for i in (1, 2) for n, s in (("prompt", (1, 3, 48)), ("gate", (1,)))}  # fmt: skip
    wide = _peft_dir(tmp_path / "wide", keys, {**cfg, "base_model_name_or_path": "somewhere/llama-48"})
    with pytest.raises(ValueError, match=r"dim=32, n_layers=3, n_heads=4.*\[1, K, 32\]"):
        convert_adapter(wide, tmp_path / "x", base=base)
    with pytest.raises(ValueError, match="not a local checkpoint"):
        convert_adapter(wide, tmp_path / "x")
    # a local base directory of another architecture
    other = tmp_path / "gpt2-base"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    save_file({"x": torch.zeros(1)}, str(other / "model.safetensors"))
    (wide / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(other)}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        convert_adapter(wide, tmp_path / "x")


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=61, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip
    m = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    d = tmp_path_factory.mktemp("hf") / "tiny-hf-llama"
    m.save_pretrained(d)
    return d


def _hf(d):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(d, attn_implementation="eager").eval()


def test_peft_parity_import(hf_base, tmp_path):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(
        _hf(hf_base), peft.AdaptionPromptConfig(adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if name.endswith("adaption_gate"):
                p.fill_(0.7 if ".1." in name else -0.4)
    pm.save_pretrained(tmp_path / "peft")
    idx = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        want = pm(idx).logits
    r = convert_adapter(tmp_path / "peft", tmp_path / "ours", base=hf_base)
    assert r["exact"] and (r["adapter_len"], r["adapter_layers"]) == (3, 2)
    ours = load_adapter(load_model(hf_base, progress=False), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), want, atol=1e-5, rtol=1e-5)
    assert ours.adapter_config.gate_activation == "identity"


def test_peft_parity_export(hf_base, tmp_path):
    peft = pytest.importorskip("peft")
    ours = random_adapter(load_model(hf_base, progress=False), per_head=False, act="tanh")
    save_adapter(ours, tmp_path / "ours")
    convert_adapter(tmp_path / "ours", tmp_path / "peft", to="peft")
    pm = peft.PeftModel.from_pretrained(_hf(hf_base), tmp_path / "peft").eval()
    idx = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(pm(idx).logits, ours(idx), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ inspect and list
def test_inspect_and_list(meta_base, tmp_path):
    d, _, _ = meta_base
    root = tmp_path / "adapters"
    root.mkdir()
    make_official_adapter(root / "official.pth")
    convert_adapter(root / "official.pth", root / "ours", base=d)
    convert_adapter(root / "ours", root / "peft", to="peft", strict=False)
    (root / "notes").mkdir()
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")

    info = inspect_adapter(root / "ours")
    base = base_config(d)
    assert info["format"] == "llama-adapter"
    assert info["config"]["adapter_len"] == 10 and info["config"]["adapter_layers"] == 2
    assert info["tensors"] == {"adapter.gates": {"shape": [2, 4], "dtype": "F32"},
                               "adapter.prompts": {"shape": [20, 32], "dtype": "F32"}}  # fmt: skip
    assert info["trainable_parameters"] == 20 * 32 + 2 * 4
    assert info["size_bytes"] > 4 * (20 * 32 + 2 * 4)
    assert info["base"]["fingerprint"] == base.fingerprint() and info["base"]["dim"] == 32
    assert info["metadata"]["converted_from"]["format"] == "official"

    peft_info = inspect_adapter(root / "peft")
    assert peft_info["format"] == "peft" and peft_info["base"]["adapted_layers"] == [2, 3]
    assert peft_info["trainable_parameters"] == 20 * 32 + 2
    off = inspect_adapter(root / "official.pth")
    assert off["base"]["n_heads"] == 4 and off["config"]["adapter_layers"] == 2

    rows = {r["name"]: r for r in list_adapters(root)}
    assert set(rows) == {"official.pth", "ours", "peft", "broken"}
    assert "not valid JSON" in rows["broken"]["error"]


# ----------------------------------------------------------------------------------------------- merge
def test_merge(tmp_path):
    base = tiny_llama(std=0.1, frozen=True)
    v1 = random_adapter(base)
    with pytest.raises(ValueError, match="prompt adapters cannot be merged"):
        merge_adapter(v1)
    with pytest.raises(ValueError, match="no V2 bias/scale"):
        merge_bias_scale(v1)
    v1.detach_base()
    v2 = AdaptedLLaMA(base, AdapterConfig(adapter_len=3, adapter_layers=2, bias_scale=True)).eval()
    with torch.no_grad():
        for name, p in v2.named_parameters():
            if name.endswith("adapter_scale"):
                p.uniform_(0.5, 1.5)
    idx = torch.randint(0, 61, (1, 5))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # zero gates: nothing left unmerged, no warning
        sd = merge_adapter(v2)
        want = v2(idx)
    merged = LLaMA(base.config)
    merged.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(idx), want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- bad input (issue 18)
def test_convert_base_writes_the_tokenizer(tmp_path):
    """`convert base` output is a model directory of its own: `generate --model hf_out` needs no flag."""
    if not STORIES.exists():
        pytest.skip(f"{STORIES} not found")
    report = convert_base(STORIES, tmp_path / "hf")
    assert report["tokenizer_files"] == ["tokenizer.bin"] and report["notes"] == []
    params = SamplingParams(max_new_tokens=24)
    tokens = []
    for spec in (STORIES, tmp_path / "hf"):
        model = load_model(spec, progress=False)
        tok = load_tokenizer(model.config.extra["tokenizer"])
        tokens.append(generate(model, [tok.encode("Once upon a time", bos=True)], params)[0])
    assert tokens[0] == tokens[1] and len(tokens[0]) == 24


@pytest.fixture
def adapter_files(meta_base, tmp_path):
    """An official .pth, a PEFT directory and ours, all for the tiny Meta base (given as its Config)."""
    d, _, _ = meta_base
    make_official_adapter(tmp_path / "official.pth")
    convert_adapter(tmp_path / "official.pth", tmp_path / "ours", base=d)
    convert_adapter(tmp_path / "ours", tmp_path / "peft", to="peft")
    return base_config(d), tmp_path


@pytest.mark.parametrize("slow", [pytest.param(True, marks=pytest.mark.slow), False])
def test_fuzz_official_and_peft_adapter_files(adapter_files, slow):
    base, d = adapter_files
    sizes = dict(cuts=150, flips=300, seed=1) if slow else dict(cuts=12, flips=12)
    for path, read in [
        (d / "official.pth", lambda: (read_official(d / "official.pth", base), inspect_adapter(d / "official.pth"))),
        (d / "peft" / "adapter_model.safetensors", lambda: (read_peft(d / "peft", base), inspect_adapter(d / "peft"))),
        (d / "peft" / "adapter_config.json", lambda: (read_peft(d / "peft", base), inspect_adapter(d / "peft"))),
        (d / "ours" / "adapter.safetensors", lambda: (read_ours(d / "ours"), inspect_adapter(d / "ours"))),
    ]:
        fuzz_file(path, read, head=1024, **sizes)
    fuzz_json(d / "peft" / "adapter_config.json", lambda: (read_peft(d / "peft", base), inspect_adapter(d / "peft")))


def test_malformed_adapter_files_are_one_line_errors(adapter_files):
    base, d = adapter_files
    (d / "peft" / "adapter_config.json").write_text("[1, 2]")
    for call in (lambda: convert_adapter(d / "peft", d / "x", base=base), lambda: inspect_adapter(d / "peft")):
        with pytest.raises(ValueError, match=r"adapter_config.json: expected a JSON object, found a list"):
            call()
    (d / "peft" / "adapter_config.json").write_text(json.dumps({"adapter_len": 10}))  # no peft_type
    with pytest.raises(ValueError, match="neither a llama-adapter config .* nor a PEFT config"):
        detect_format(d / "peft")
    with pytest.raises(ValueError, match="peft_type=None; only ADAPTION_PROMPT"):
        read_peft(d / "peft", base)
    meta = json.loads((d / "ours" / "adapter_config.json").read_text())
    (d / "ours" / "adapter_config.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "base"}))
    with pytest.raises(ValueError, match="needs an 'adapter' object and a 'base' object"):
        read_ours(d / "ours")
    torch.save({"adapter_query.weight": "rows", "layers.3.attention.gate": torch.ones(1)}, d / "official.pth")
    with pytest.raises(ValueError, match="'adapter_query.weight' is a str, not a tensor"):
        read_official(d / "official.pth", base)
    torch.save({"adapter_query.weight": torch.nn.Linear(2, 2)}, d / "official.pth")
    with pytest.raises(ValueError, match=r"holds arbitrary Python objects \(torch.nn.modules.linear.Linear\)"):
        convert_adapter(d / "official.pth", d / "x", base=base)
