"""Packed q4_0/q4_1/q8_0 weights, GGUF type conversions and the C++ kernels, against independent references:
gguf-py's quantizers and dequantizers, and float64 matmuls of the dequantized weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_py_dequantize
from gguf.quants import quantize as gguf_py_quantize

from llama_adapter.quant import (
    FORMATS,
    KERNELS,
    REPACKED_TYPES,
    QuantEmbedding,
    QuantLinear,
    convert_layout,
    dequantize,
    gguf_dequantize,
    gguf_to_packed,
    is_quantized_type,
    kernels_available,
    quant_linear,
    quantize,
    quantize_linear,
    quantize_linears,
    reference_path,
)
from llama_adapter.quant.formats import BLOCK_BYTES

SRC = Path(__file__).resolve().parents[1] / "src"
GGUF_TYPES = ["Q4_0", "Q4_1", "Q8_0", *REPACKED_TYPES]
# Byte offsets of each type's fp16 scale fields inside one block (random bytes there give NaN/inf scales).
FP16_FIELDS = {
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
    "IQ4_NL": [0],
    "IQ4_XS": [0],
}
kernels = pytest.mark.skipif(not kernels_available(), reason="C++ kernels unavailable (no compiler or no AVX2)")


def random_blocks(name: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random bytes for `n_blocks` GGUF blocks of type `name`, with fp16 scales of sane size (1e-3..1e-1)."""
    rng = np.random.default_rng(seed)
    _, size = __import__("gguf").GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for off in FP16_FIELDS[name]:
        scale = (rng.uniform(1e-3, 1e-1, n_blocks) * rng.choice([-1, 1], n_blocks)).astype(np.float16)
        raw[:, off : off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return raw


def q8_activations(x: torch.Tensor) -> torch.Tensor:
    """What the int8 kernel sees: x quantized per 32-block to int8 (round half to even) and scaled back."""
    b = x.reshape(-1, 32).double()
    amax = b.abs().amax(1, keepdim=True).float()
    inv = torch.where(amax == 0, 0.0, 127.0 / amax)
    q = torch.round(b.float() * inv)
    return (q.double() * (amax / 127.0).double()).reshape(x.shape)


# ------------------------------------------------------------------------------------------ formats
@pytest.fixture(params=["cpp", "torch"])
def path(request: pytest.FixtureRequest):
    """Run a test with the C++ ops and with the torch reference path (the fallback)."""
    if request.param == "cpp":
        if not kernels_available():
            pytest.skip("C++ kernels unavailable")
        yield "cpp"
    else:
        with reference_path():
            yield "torch"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_is_bit_exact_with_gguf_py(fmt: str, dtype: torch.dtype, path: str) -> None:
    torch.manual_seed(0)
    w = (torch.randn(24, 256) * torch.rand(24, 1) * 3).to(dtype)
    w[0, :32] = 0  # an all-zero block (scale 0)
    w[1, 32:64] = 1.0  # a constant block (q4_1: max == min)
    w[2, 64:96] = torch.linspace(-1, 1, 32)  # ties for the largest magnitude: the first one's sign wins
    w[3, :32] = torch.arange(32) - 15.5  # q8_0: x / d lands on .5 exactly: roundf rounds away from zero
    w[3, 0] = 127
    ref = gguf_py_quantize(w.float().numpy(), GGMLQuantizationType[fmt.upper()])
    assert np.array_equal(quantize(w, fmt).numpy(), ref.reshape(24, -1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_matches_gguf_py_and_error_is_half_a_step(fmt: str) -> None:
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    packed = quantize(w, fmt)
    assert packed.shape == (16, 128 // 32 * BLOCK_BYTES[fmt]) and packed.dtype == torch.uint8
    deq = dequantize(packed, fmt)
    ref = gguf_py_dequantize(packed.numpy(), GGMLQuantizationType[fmt.upper()])
    assert np.array_equal(deq.numpy(), ref)
    # round to nearest: within half a step, plus q * the fp16 rounding of the scale (up to 127 * 2^-11 of a step
    # for q8_0); q4_0 maps the largest magnitude to -8, so values near +max clip at +7: a whole step there
    blocks, err = w.reshape(-1, 32), (deq - w).reshape(-1, 32).abs().amax(1)
    step = {"q8_0": blocks.abs().amax(1) / 127 / 2, "q4_0": blocks.abs().amax(1) / 8}.get(
        fmt, (blocks.amax(1) - blocks.amin(1)) / 15 / 2
    )
    assert (err <= step * (1.15 if fmt == "q8_0" else 1.05) + 1e-6).all()


@kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_cpp_dequantize_and_embedding_match_reference(fmt: str) -> None:
    packed = quantize(torch.randn(50, 96), fmt)
    layer = QuantLinear(packed, fmt)
    assert torch.equal(layer.dequantize(), dequantize(packed, fmt))
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    assert torch.equal(QuantEmbedding.tied_to(layer)(ids), dequantize(packed, fmt)[ids])
    with pytest.raises(RuntimeError, match="out of range"):
        layer.embed(torch.tensor([50]))


# ------------------------------------------------------------------------------------------ GGUF types
@pytest.mark.parametrize("name", GGUF_TYPES)
def test_gguf_dequantize_matches_gguf_py(name: str) -> None:
    block = 256 if name.endswith("_K") or name == "IQ4_XS" else 32
    raw = random_blocks(name, 64)
    shape = (8, 64 // 8 * block)
    ours = gguf_dequantize(GGMLQuantizationType[name], raw, shape)
    ref = gguf_py_dequantize(raw.reshape(8, -1), GGMLQuantizationType[name])
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_gguf_repack_keeps_values(name: str, path: str) -> None:
    """Re-packed weights vs the file's own values, relative to each 32-block's largest magnitude: exact up to
    fp16 rounding where the target format can hold the values, within half an 8-bit step where requantized."""
    block = 256 if name.endswith("_K") or name == "IQ4_XS" else 32
    raw = random_blocks(name, 64, seed=1)
    shape = (8, 64 // 8 * block)
    packed, fmt = gguf_to_packed(int(GGMLQuantizationType[name]), raw, shape)
    want = torch.from_numpy(gguf_py_dequantize(raw.reshape(8, -1), GGMLQuantizationType[name])).reshape(-1, 32)
    err = (dequantize(packed, fmt).reshape(-1, 32) - want).abs().amax(1) / want.abs().amax(1).clamp_min(1e-12)
    exact = {"Q4_0": 0, "Q4_1": 0, "Q8_0": 0, "Q5_0": 0, "IQ4_NL": 0, "Q4_K": 2e-3, "IQ4_XS": 1e-3}
    bound = exact.get(name, 0.5 / 127 + 1e-3)
    assert err.max().item() <= bound, (name, fmt, err.max().item())
    assert fmt == {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0", **REPACKED_TYPES}[name]


@kernels
@pytest.mark.parametrize("name", list(REPACKED_TYPES))
def test_cpp_repack_is_bit_exact_with_torch_repack(name: str) -> None:
    block = 256 if name.endswith("_K") or name == "IQ4_XS" else 32
    raw = random_blocks(name, 96, seed=2)
    cpp, fmt = gguf_to_packed(name, raw, (12, 96 // 12 * block))
    with reference_path():
        ref, _ = gguf_to_packed(name, raw, (12, 96 // 12 * block))
    assert torch.equal(cpp, ref)


def test_gguf_native_types_share_memory_and_float_types_say_what_to_do() -> None:
    raw = random_blocks("Q4_1", 12)
    packed, fmt = gguf_to_packed(GGMLQuantizationType.Q4_1, raw, (3, 128))
    assert fmt == "q4_1" and packed.data_ptr() == torch.from_numpy(raw).data_ptr()
    assert not is_quantized_type("F16") and is_quantized_type(GGMLQuantizationType.Q6_K)
    with pytest.raises(ValueError, match="float type: keep it as nn.Linear"):
        gguf_to_packed(GGMLQuantizationType.F16, np.zeros(8, np.uint8), (2, 2))


def test_unsupported_gguf_type_names_it_and_the_supported_ones() -> None:
    with pytest.raises(ValueError, match=r"GGUF type IQ2_XS is not supported; supported: F32, F16, BF16, Q4_0"):
        QuantLinear.from_gguf(GGMLQuantizationType.IQ2_XS, np.zeros(74, np.uint8), (1, 256))
    with pytest.raises(ValueError, match="GGUF type IQ1_S is not supported"):
        is_quantized_type(GGMLQuantizationType.IQ1_S)


def test_smollm2_gguf_tensors_load_packed(smollm2_gguf: Path) -> None:
    from llama_adapter.checkpoint import dequantize as checkpoint_dequantize
    from llama_adapter.checkpoint import read_gguf

    g = read_gguf(smollm2_gguf)
    for name in ("blk.0.ffn_down.weight", "token_embd.weight"):
        shape, qtype, off = g.tensors[name]
        layer = QuantLinear.from_gguf(qtype, g.data[off:], shape)
        assert (layer.out_features, layer.in_features) == shape
        want = checkpoint_dequantize(g.data[off:], qtype, shape)
        assert torch.equal(layer.dequantize()[:512], want[:512])


# ------------------------------------------------------------------------------------------ kernels
@kernels
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 3, 8, 33, 100])
def test_kernels_match_float64_reference(fmt: str, m: int) -> None:
    torch.manual_seed(m)
    n, k = 97, 160  # odd N: partial weight tiles; K = 5 blocks
    packed = quantize(torch.randn(n, k), fmt)
    w = dequantize(packed, fmt).double()
    x = torch.randn(m, k)
    exact = x.double() @ w.T
    for kernel in ("fp32", "mm"):  # exact activations
        y = quant_linear(x, packed, fmt, kernel=kernel)
        torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-4)
    for kernel in ("rows", "packed"):  # 8-bit activations: exactly that computation ...
        y8 = quant_linear(x, packed, fmt, kernel=kernel)
        torch.testing.assert_close(y8.double(), q8_activations(x) @ w.T, rtol=1e-5, atol=1e-4)
        # ... which is within ~1% of the fp32 one
        assert ((y8.double() - exact).norm() / exact.norm()).item() < 1.5e-2


@kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernels_are_batch_invariant_and_thread_count_independent(fmt: str) -> None:
    torch.manual_seed(2)
    packed = quantize(torch.randn(300, 256), fmt)
    x = torch.randn(9, 256)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = {kernel: quant_linear(x, packed, fmt, kernel=kernel) for kernel in KERNELS}
        torch.set_num_threads(2)
        two = {kernel: quant_linear(x, packed, fmt, kernel=kernel) for kernel in KERNELS}
    finally:
        torch.set_num_threads(threads)
    for kernel in ("rows", "fp32", "packed"):  # each output is summed by one thread in a fixed order
        assert torch.equal(one[kernel], two[kernel]), kernel
    torch.testing.assert_close(one["mm"], two["mm"])  # MKL may split K differently
    # a row's result does not depend on the rest of the batch (the packed kernel, forced at M = 1, sums in the
    # same order; the decode path at M = 1 splits K over two accumulators: equal up to fp32 rounding)
    rows = torch.cat([quant_linear(x[i : i + 1], packed, fmt, kernel="packed") for i in range(9)])
    assert torch.equal(rows, one["packed"])
    rows = torch.cat([quant_linear(x[i : i + 1], packed, fmt) for i in range(9)])
    torch.testing.assert_close(rows, one["packed"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_x8_layout_conversions_round_trip_and_match_cpp(fmt: str) -> None:
    from llama_adapter.quant.formats import from_x8, to_x8

    packed = quantize(torch.randn(24, 96), fmt)
    x8 = to_x8(packed, fmt)
    assert not torch.equal(x8, packed) and torch.equal(from_x8(x8, fmt), packed)
    if kernels_available():
        assert torch.equal(convert_layout(packed, fmt, "gguf", "x8"), x8)
        assert torch.equal(convert_layout(x8, fmt, "x8", "gguf"), packed)
    with pytest.raises(ValueError, match="multiples of 8"):
        convert_layout(quantize(torch.randn(12, 32), fmt), fmt, "gguf", "x8")


@kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_x8_layout_computes_what_the_gguf_layout_does(fmt: str) -> None:
    torch.manual_seed(8)
    gguf = QuantLinear.from_float(torch.randn(104, 160), fmt)
    x8 = QuantLinear.from_float(torch.randn(104, 160), fmt)
    x8.load_state_dict(gguf.state_dict())  # same bytes; the gguf-layout state is re-laid out on load
    x8.relayout("x8")
    assert x8.layout == "x8" and not torch.equal(x8.weight, gguf.weight)
    assert torch.equal(x8.dequantize(), gguf.dequantize())
    ids = torch.tensor([0, 103, 50])
    assert torch.equal(x8.embed(ids), gguf.embed(ids))
    for m in (1, 3, 8, 33, 100):  # int8 activations: the same integer dots and float epilogue as "packed"
        x = torch.randn(m, 160)
        assert torch.equal(x8(x), quant_linear(x, gguf.weight, fmt, kernel="packed")), m
        torch.testing.assert_close(quant_linear(x, x8.weight, fmt, "fp32", layout="x8"), x @ gguf.dequantize().T)
    x = torch.randn(5, 160, requires_grad=True)
    x8(x).backward(gy := torch.randn(5, 104))
    torch.testing.assert_close(x.grad, gy @ gguf.dequantize(), rtol=1e-5, atol=1e-4)
    with reference_path():  # the torch fallback reads x8 too
        torch.testing.assert_close(x8(x.detach()), F.linear(x.detach(), gguf.dequantize()))
    back = QuantLinear.from_float(torch.randn(104, 160), fmt)
    back.load_state_dict(x8.state_dict())  # x8 bytes into a gguf-layout module
    assert torch.equal(back.weight, gguf.weight)
    fused = QuantLinear.cat([x8, QuantLinear.from_float(torch.randn(16, 160), fmt, layout="x8")])
    assert torch.equal(fused(x.detach())[:, :104], x8(x.detach()))


def _cpu_ticks_per_thread() -> dict[str, int]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        out[tid] = int(fields[11]) + int(fields[12])
    return out


@kernels
@pytest.mark.skipif(not Path("/proc/self/task").exists() or (os.cpu_count() or 1) < 2, reason="Linux, 2+ cores")
def test_kernels_run_on_torchs_threads() -> None:
    """at::parallel_for only parallelises when the extension is built with -fopenmp (it silently ran on one
    thread before); it must then use torch's OpenMP runtime, not a second one."""
    layer = QuantLinear.from_float(torch.randn(8192, 1024), "q4_1")
    x = torch.randn(64, 1024)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        layer(x)
        before = _cpu_ticks_per_thread()
        for _ in range(20):
            layer(x)
        after = _cpu_ticks_per_thread()
    finally:
        torch.set_num_threads(threads)
    busy = [tid for tid in after if after[tid] - before.get(tid, 0) > 0]
    assert len(busy) >= 2, "the kernels ran on one thread"
    # our libgomp.so.1 dependency resolved to the copy torch loaded, not to the compiler's own
    runtimes = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "gomp" in line}
    assert not any(path.startswith("/usr/") for path in runtimes), runtimes


@kernels
def test_cat_along_out_features_equals_separate_layers() -> None:
    torch.manual_seed(3)
    a, b = QuantLinear.from_float(torch.randn(64, 96), "q4_1"), QuantLinear.from_float(torch.randn(33, 96), "q4_1")
    fused = QuantLinear.cat([a, b])
    x = torch.randn(2, 5, 96)
    assert fused.out_features == 97 and torch.equal(fused(x), torch.cat([a(x), b(x)], dim=-1))
    with pytest.raises(ValueError, match="one format, layout and K"):
        QuantLinear.cat([a, QuantLinear.from_float(torch.randn(8, 96), "q8_0")])


@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_linear_module_against_nn_linear(fmt: str) -> None:
    torch.manual_seed(4)
    lin = torch.nn.Linear(64, 40, bias=True)
    q = quantize_linear(lin, fmt)
    assert (q.in_features, q.out_features) == (64, 40) and not any(True for _ in q.parameters())
    x = torch.randn(3, 2, 64, dtype=torch.bfloat16)
    y = q(x)
    ref = F.linear(x.float(), q.dequantize(), lin.bias.detach())
    assert y.dtype == torch.bfloat16 and y.shape == (3, 2, 40)
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)


def test_from_packed_bytes_and_state_dict_round_trip() -> None:
    torch.manual_seed(7)
    w = torch.randn(40, 64)
    raw = quantize(w, "q4_1").numpy().tobytes()  # e.g. a tensor's bytes read from a file
    layer = QuantLinear.from_packed(np.frombuffer(raw, np.uint8).copy(), "q4_1", (40, 64))
    assert torch.equal(layer.weight, quantize(w, "q4_1"))
    other = QuantLinear.from_float(torch.randn(40, 64), "q4_1")
    other.load_state_dict(layer.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(other(x), layer(x))
    with pytest.raises(ValueError, match="needs 1600 bytes"):
        QuantLinear.from_packed(np.zeros(10, np.uint8), "q4_1", (40, 64))


def test_quantize_linears_replaces_matching_layers() -> None:
    nn = torch.nn
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10), nn.Linear(10, 3))
    done = quantize_linears(model, "q8_0", include=lambda name, mod: name != "2")
    assert done == ["0"] and isinstance(model[0], QuantLinear) and isinstance(model[2], torch.nn.Linear)


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 200])  # "rows" / "packed" forward
def test_input_gradient_through_frozen_quantized_linear(fmt: str, m: int) -> None:
    torch.manual_seed(5)
    layer = QuantLinear.from_float(torch.randn(48, 64), fmt)
    w = layer.dequantize()
    x = torch.randn(m, 64, requires_grad=True)
    gy = torch.randn(m, 48)
    layer(x).backward(gy)
    torch.testing.assert_close(x.grad, gy @ w, rtol=1e-5, atol=1e-4)
    assert layer.weight.grad is None and not layer.weight.requires_grad


@kernels
def test_transposed_copy_input_gradient_is_close() -> None:
    torch.manual_seed(9)
    layer = QuantLinear.from_float(torch.randn(64, 96), "q4_1").keep_transposed_copy()
    assert layer.weight_t.shape == (96, 64 // 32 * 34) and "weight_t" not in layer.state_dict()
    x, gy = torch.randn(40, 96, requires_grad=True), torch.randn(40, 64)
    layer(x).backward(gy)
    exact = gy @ layer.dequantize()
    assert ((x.grad - exact).norm() / exact.norm()).item() < 2e-2  # 8-bit grad_y and W^T
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantLinear.from_float(torch.randn(40, 96), "q4_1").keep_transposed_copy()


# ------------------------------------------------------------------------------------------ fallback
@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_path_gives_the_exact_activation_result(fmt: str) -> None:
    torch.manual_seed(6)
    layer = QuantLinear.from_float(torch.randn(40, 64), fmt)
    x = torch.randn(5, 64, requires_grad=True)
    with reference_path():
        assert not kernels_available()
        y = layer(x)
        y.sum().backward()
        ids = torch.tensor([1, 39])
        assert torch.equal(layer.embed(ids), layer.dequantize()[ids])
    torch.testing.assert_close(y, F.linear(x, dequantize(layer.weight, fmt)))
    torch.testing.assert_close(x.grad, dequantize(layer.weight, fmt).sum(0).expand(5, -1))


FALLBACK_CODE = (
    "import torch; from llama_adapter.quant import QuantLinear, kernels_available\n"
    "q = QuantLinear.from_float(torch.randn(8, 32), 'q4_0')\n"
    "q(torch.randn(2, 32)); q(torch.randn(1, 32)); print(kernels_available())"
)


def fallback_notices(**env: str) -> list[str]:
    """Run FALLBACK_CODE in a fresh process with `env`; it must work; returns its llama_adapter.quant lines."""
    env = {**os.environ, "PYTHONPATH": str(SRC), **env}
    r = subprocess.run([sys.executable, "-c", FALLBACK_CODE], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    return [line for line in r.stderr.splitlines() if "llama_adapter.quant" in line]


def test_no_ext_env_falls_back_with_one_notice() -> None:
    notices = fallback_notices(LLAMA_ADAPTER_NO_EXT="1")
    assert len(notices) == 1 and "LLAMA_ADAPTER_NO_EXT" in notices[0] and "reference path" in notices[0]


def test_missing_or_broken_compiler_falls_back(tmp_path: Path) -> None:
    notices = fallback_notices(CXX="no-such-compiler-here", LLAMA_ADAPTER_CACHE=str(tmp_path))
    assert len(notices) == 1 and "no C++ compiler" in notices[0]
    notices = fallback_notices(CXX="false", LLAMA_ADAPTER_CACHE=str(tmp_path))  # `false` fails every command
    assert "compiling the CPU kernels once" in notices[0]  # the first-build notice, then one fallback notice
    assert len(notices) == 2 and "building the kernels failed" in notices[1] and "reference path" in notices[1]
    notices = fallback_notices(CXX="false", LLAMA_ADAPTER_CACHE=str(tmp_path))  # remembered: no second attempt
    assert len(notices) == 1 and "an earlier build failed" in notices[0]


# ------------------------------------------------------------------------------------------ torch.compile
@kernels
def test_ops_compile_without_graph_breaks() -> None:
    layer = QuantLinear.from_float(torch.randn(64, 64), "q4_0")
    emb = QuantEmbedding.tied_to(layer)

    def f(ids: torch.Tensor) -> torch.Tensor:
        return layer(torch.relu(emb(ids))).sum(-1)

    ids = torch.tensor([[1, 2, 3]])
    compiled = torch.compile(f, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    assert torch.equal(compiled(ids), f(ids))


@kernels
@pytest.mark.slow
def test_inductor_compiles_forward_and_input_gradient() -> None:
    """Inductor (~40 s on a busy 2-core machine): the custom ops inside an autograd.Function, both ways."""
    layer = QuantLinear.from_float(torch.randn(64, 64), "q4_1")
    emb = QuantEmbedding.tied_to(layer)

    def f(ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return layer(torch.relu(emb(ids)) + x).sum()

    ids, x = torch.tensor([[1, 2, 3]]), torch.randn(1, 3, 64, requires_grad=True)
    torch.compile(f, fullgraph=True)(ids, x).backward()
    compiled_grad, x.grad = x.grad, None
    f(ids, x).backward()
    torch.testing.assert_close(compiled_grad, x.grad, rtol=1e-4, atol=1e-4)
