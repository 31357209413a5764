"""Low-precision frozen bases (`--weights`): a GGUF's quantized tensors stay packed, float checkpoints
quantize at load, quality holds, adapters train through packed weights, and bad requests are one line."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import STORIES

from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig
from llama_adapter.checkpoint import load_model
from llama_adapter.generate import generate
from llama_adapter.loading import load_stack, resolve_weights
from llama_adapter.quant import QuantEmbedding, QuantLinear, kernels_available
from llama_adapter.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
needs_kernels = pytest.mark.skipif(not kernels_available(), reason="the AVX2 kernels are not available here")


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, torch.nn.Linear))}


@needs_kernels
def test_gguf_keeps_its_quantized_tensors_packed(smollm2_gguf):
    model = load_model(smollm2_gguf, weights="keep", progress=False)
    mods = linears(model)
    assert all(isinstance(m, QuantLinear) for m in mods.values())
    assert {m.fmt for n, m in mods.items() if n.startswith("layers.")} == {"q4_1"}
    assert mods["output"].fmt == "q8_0" and isinstance(model.tok_embeddings, QuantEmbedding)
    assert model.tok_embeddings.weight is model.output.weight  # tied: one packed table
    assert model.config.extra["weights"] == "q4_1+q8_0"
    packed = sum(b.numel() for b in model.buffers() if b.dtype == torch.uint8)
    assert 90e6 < packed < 110e6  # the 98 MB file, not 540 MB of fp32
    # Same weights, 8-bit activations: greedy decoding agrees with the dequantized fp32 model.
    ref = load_model(smollm2_gguf, progress=False)
    prompt = [1, 504, 3458, 282, 4649, 314]  # "The capital of France is" (SmolLM2 ids)
    want = generate(ref, [prompt], SamplingParams(max_new_tokens=12))
    assert generate(model, [prompt], SamplingParams(max_new_tokens=12)) == want


@needs_kernels
@pytest.mark.parametrize("fmt", ["q8_0", "q4_1"])
def test_float_checkpoint_quantizes_at_load(fmt):
    ref = load_model(STORIES, progress=False)
    q = load_model(STORIES, weights=fmt, progress=False)
    mods = linears(q)
    # stories260K's SwiGLU width (172) is not whole 32-blocks: w2 stays float, the rest is packed
    assert {type(m).__name__ for n, m in mods.items() if n.endswith("w2")} == {"Linear"}
    assert all(isinstance(m, QuantLinear) and m.fmt == fmt for n, m in mods.items() if not n.endswith("w2"))
    idx = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (q(idx) - ref(idx)).abs().max() / ref(idx).abs().max()
    assert err < (0.02 if fmt == "q8_0" else 0.25)  # 4 bits on a 260K-parameter model: coarse
    if fmt == "q8_0":  # 8-bit keeps greedy decoding of the real story
        p = [1, 403, 407, 261, 378]
        assert generate(q, [p], SamplingParams(max_new_tokens=40)) == generate(
            ref, [p], SamplingParams(max_new_tokens=40)
        )


@needs_kernels
def test_adapter_trains_through_a_packed_base():
    """Zero-init still gives exactly the frozen (packed) model, and gradients reach the adapter through
    the packed linears (their input gradient), two steps in a row."""
    base = load_model(STORIES, weights="q8_0", progress=False)
    idx = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        frozen = base(idx)
    model = AdaptedLLaMA(base, AdapterConfig(adapter_len=4, adapter_layers=3))
    with torch.no_grad():
        assert torch.equal(model(idx), frozen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        loss = torch.nn.functional.cross_entropy(model(idx)[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        assert model.adapter.gates.grad.abs().sum() > 0
        # zero gates: the prompts' gradient is exactly 0 at step 0 and flows once the gates open
        assert (model.adapter.prompts.grad.abs().sum() > 0) == (step > 0)
        opt.step()
        opt.zero_grad()
    assert not any(b.requires_grad for b in base.buffers())


def test_auto_rule():
    if kernels_available():
        assert resolve_weights("auto", "smollm2-135m-instruct") == "keep"
        assert resolve_weights("auto", str(STORIES)) == "q8_0"
        assert resolve_weights("auto", str(STORIES), purpose="instruct") is None
        assert resolve_weights("q4", str(STORIES)) == "q4_1"
    assert resolve_weights("fp16", str(STORIES)) == "fp16"
    with pytest.raises(ValueError, match="--weights 'q3': choose one of auto"):
        resolve_weights("q3", str(STORIES))


def test_no_kernels_falls_back_with_one_notice(tmp_path):
    """Asking for q4 where the kernels cannot run is a one-line notice and fp32 weights, not a crash."""
    code = (
        "from llama_adapter.loading import load_stack; "
        f"s = load_stack({str(STORIES)!r}, weights='q4'); print(s.model.config.extra['weights'])"
    )
    env = {**os.environ, "LLAMA_ADAPTER_NO_EXT": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "float32"
    notes = [line for line in r.stderr.splitlines() if "--weights q4" in line]
    assert len(notes) == 1 and "using fp32 weights" in notes[0]


def test_unsupported_gguf_type_is_one_line(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "iq2.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, v in [("embedding_length", 64), ("block_count", 1), ("attention.head_count", 2),
                   ("feed_forward_length", 64), ("context_length", 32)]:  # fmt: skip
        w.add_uint32(f"llama.{key}", v)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(32)])
    w.add_tensor("token_embd.weight", np.zeros((32, 64), np.float32))
    # IQ2_XS: 256 weights in 74 bytes; a [64, 256] weight is 64 such blocks
    w.add_tensor("blk.0.attn_q.weight", np.zeros((64, 74), np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.IQ2_XS)  # fmt: skip
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"GGUF type IQ2_XS, which is not supported; supported: F32, .*Q4_K"):
        load_model(path, weights="keep", progress=False)


def test_weights_flag_reaches_the_cli(capsys):
    from llama_adapter.cli import main

    rc = main(["generate", "--model", str(STORIES), "--template", "plain", "--prompt", "Once upon a time",
               "--max-new-tokens", "12", "--weights", "fp32"])  # fmt: skip
    assert rc == 0 and "Lily" in capsys.readouterr().out
    stack = load_stack(str(STORIES), weights="fp16")
    assert stack.model.dtype == torch.float16


def test_fused_projections_compute_the_same():
    """Inference fuses q/k/v and gate/up into one matmul each: same logits (float and packed), and an
    adapter's prompt K/V come out of the fused projection unchanged."""
    from helpers import tiny_llama

    model = tiny_llama(n_layers=2)
    ad = AdaptedLLaMA(model, AdapterConfig(adapter_len=3, adapter_layers=2))
    with torch.no_grad():
        ad.adapter.gates.uniform_(0.5, 1.0)
    idx = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_base, want_ad = model(idx), ad(idx)
        kv = ad.model.layers[1].attention.prompt_kv(ad.adapter.layer_prompts()[1][None])
        model.fuse_projections()
        assert not hasattr(model.layers[0].attention, "wq") and hasattr(model.layers[0].feed_forward, "w13")
        torch.testing.assert_close(model(idx), want_base, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ad(idx), want_ad, atol=1e-6, rtol=1e-5)
        got = ad.model.layers[1].attention.prompt_kv(ad.adapter.layer_prompts()[1][None])
        torch.testing.assert_close(got, kv, atol=1e-6, rtol=1e-5)


@needs_kernels
def test_fused_packed_model_generates_what_the_unfused_one_does():
    a = load_model(STORIES, weights="q8_0", progress=False)
    b = load_model(STORIES, weights="q8_0", progress=False)
    b.fuse_projections()
    p, params = [1, 403, 407, 261, 378], SamplingParams(max_new_tokens=30)
    assert generate(b, [p], params) == generate(a, [p], params)
    assert type(b.layers[0].attention.wqkv).__name__ == "QuantLinear"


@needs_kernels
def test_finetune_on_a_packed_base(tmp_path):
    """`finetune --weights q8` trains the adapter on a q8_0 base: the loss falls, the adapter file holds
    only adapter tensors, and it loads onto the float base for generation."""
    from helpers import story_data, tiny_run

    from llama_adapter.train import TrainArgs, finetune

    out = tmp_path / "run"
    res = finetune(TrainArgs(**tiny_run(data=str(story_data(tmp_path)), out=str(out), max_steps=12, weights="q8")))
    assert sum(res.train_losses[-3:]) < sum(res.train_losses[:3])
    stack = load_stack(str(STORIES), str(out), template="alpaca", weights="fp32")
    assert stack.adapters and not any(isinstance(m, QuantLinear) for m in stack.model.modules())


def test_finetune_rejects_an_unknown_weights_format_before_loading(tmp_path):
    from helpers import story_data, tiny_run

    from llama_adapter.train import TrainArgs, finetune

    args = TrainArgs(**tiny_run(model=str(tmp_path / "absent.bin"), data=str(story_data(tmp_path)),
                                out=str(tmp_path / "o"), weights="q3"))  # fmt: skip
    with pytest.raises(ValueError, match=r"--weights 'q3': choose one of auto"):
        finetune(args)


def test_an_adapter_wraps_a_fused_base():
    """An adapter on a base fused for inference (wqkv, w13) starts equal to it; bias/scale tuning, which
    needs the separate projections, says so in one line."""
    base = load_model(STORIES, progress=False)
    idx = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    base.fuse_projections()
    with torch.no_grad():
        frozen = base(idx)
        model = AdaptedLLaMA(base, AdapterConfig(adapter_len=4, adapter_layers=3, bind_dim=8))
        assert torch.equal(model(idx), frozen)
    with pytest.raises(ValueError, match="load the base unfused"):
        AdaptedLLaMA(base, AdapterConfig(adapter_len=4, adapter_layers=3, bias_scale=True))
