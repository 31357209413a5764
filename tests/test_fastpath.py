"""Every fast path against the plain one: logits and gradients to tight tolerances."""

import torch
from helpers import tiny_llama

from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig


def adapted(seed=0, n_kv_heads=2, adapter_layers=2):
    base = tiny_llama(n_kv_heads=n_kv_heads, seed=seed, n_layers=4)
    model = AdaptedLLaMA(base, AdapterConfig(adapter_len=3, adapter_layers=adapter_layers))
    with torch.no_grad():
        model.adapter.gates.normal_()  # open gates so the prompt branch matters
    return model


def loss_and_grads(model, idx, **kw):
    model.zero_grad(set_to_none=True)
    out = model(idx, **kw)
    out.float().pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_activation_checkpointing_gives_identical_logits_and_gradients():
    model = adapted()
    idx = torch.randint(0, 61, (2, 11))
    out, grads = loss_and_grads(model, idx)
    out_ck, grads_ck = loss_and_grads(model, idx, checkpoint_activations=True)
    assert torch.equal(out, out_ck)
    assert grads.keys() == grads_ck.keys() and grads
    for n in grads:
        assert torch.equal(grads[n], grads_ck[n]), n


def test_activation_checkpointing_skips_frozen_bottom_and_inference():
    model = adapted(adapter_layers=1)
    idx = torch.randint(0, 61, (1, 7))
    with torch.no_grad():
        ref = model(idx)
        assert torch.equal(model(idx, checkpoint_activations=True), ref)
    seen = {}
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda m, a, out, i=i: seen.setdefault(i, []).append(out.requires_grad))
    model(idx, checkpoint_activations=True).sum().backward()
    # Frozen layers run once, without a graph, and are not recomputed in the backward pass.
    assert {i: v for i, v in seen.items() if i < 3} == {0: [False], 1: [False], 2: [False]}
    assert seen[3][0] is True
    assert model.adapter.gates.grad is not None
