"""Packed rows (several examples per row, block-diagonal attention, RoPE restarting per example)
give the loss and the gradients of the same examples run one by one, with text-only prompts,
per-example image prompts and per-example bind tokens."""

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama

from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig
from llama_adapter.model import Packing

pytestmark = pytest.mark.usefixtures("one_thread")
LENGTHS = [5, 7, 3, 6]
SPANS = [[(0, 5), (5, 12)], [(0, 3), (3, 9)]]  # two rows of 12 slots; row 1 ends with 3 pad slots


def examples(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(0, 61, (n,), generator=g)
        labels = ids.clone()
        labels[:2] = -100  # the prompt part carries no loss
        out.append((ids, labels))
    return out


def loss_sum(model, idx, labels, **kw):
    h = model(idx, hidden_only=True, **kw)
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.model.output(h[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def packed(exs):
    idx = torch.zeros(2, 12, dtype=torch.long)
    labels = torch.full((2, 12), -100)
    j = 0
    for b, row in enumerate(SPANS):
        for s, e in row:
            idx[b, s:e], labels[b, s:e] = exs[j]
            j += 1
    return idx, labels


def adapter(**cfg):
    torch.manual_seed(0)
    ad = AdaptedLLaMA(tiny_llama(n_layers=3), AdapterConfig(adapter_len=4, adapter_layers=2, **cfg))
    with torch.no_grad():
        ad.adapter.gates.uniform_(0.5, 1.0)  # open gates: the prompts matter
        for m in ad.modules():
            if hasattr(m, "adapter_bind_gate"):
                m.adapter_bind_gate.fill_(0.7)
    return ad.train()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["text", "image", "bind"])
def test_packed_loss_and_grads_equal_unpacked(kind):
    exs = examples()
    cfg = {"text": {}, "image": {"visual_dim": 8}, "bind": {"bind_dim": 6, "bind_blocks": 1}}[kind]
    model = adapter(**cfg)
    feats = torch.randn(
        len(exs), cfg.get("visual_dim", cfg.get("bind_dim", 1)), generator=torch.Generator().manual_seed(1)
    )
    has = torch.tensor([True, False, True, True])  # one example without an image: it adds nothing

    def ctx(rows):
        if kind == "image":
            return model.prompt_state(visual=feats[rows], has_image=has[rows])
        if kind == "bind":
            return model.prompt_state(bind=feats[rows], has_image=has[rows])
        return None

    total = 0.0
    for j, (ids, labels) in enumerate(exs):
        total = total + loss_sum(model, ids[None], labels[None], ctx=ctx([j]))
    total.backward()
    want = grads(model)
    model.zero_grad()
    idx, labels = packed(exs)
    got = loss_sum(model, idx, labels, ctx=ctx(list(range(4))), packing=Packing(SPANS))
    got.backward()
    torch.testing.assert_close(got, total, atol=1e-5, rtol=1e-5)
    have = grads(model)
    assert set(have) == set(want) and len(want) > 0
    for n in want:
        torch.testing.assert_close(have[n], want[n], atol=1e-5, rtol=1e-4, msg=n)


def test_packing_checks_its_spans():
    model = tiny_llama(n_layers=1)
    with pytest.raises(ValueError, match="do not fit"):
        model(torch.zeros(1, 4, dtype=torch.long), packing=Packing([[(0, 6)]]))
    with pytest.raises(ValueError, match="for training"):
        model(torch.zeros(1, 4, dtype=torch.long), packing=Packing([[(0, 4)]]), cache=model.new_cache(1, 8))
