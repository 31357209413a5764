"""Packed rows (several examples per row, block-diagonal attention, RoPE restarting per example)
give the loss and the gradients of the same examples run one by one, with text-only prompts,
per-example image prompts and per-example bind tokens: in the model, and in the trainer's batches."""

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama

from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig
from llama_adapter.data import Encoded, collate_packed, pad_fraction, target_count
from llama_adapter.model import Packing
from llama_adapter.multimodal import visual_make_ctx
from llama_adapter.train import Recipe, TrainArgs, token_loss_sum

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


# ------------------------------------------------------------------ the trainer's packed batches
def encoded(n=12, visual_dim=0, seed=0):
    """Encoded examples of 4..19 tokens, prompt masked; with `visual_dim`, two of three have an image."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for j in range(n):
        length = int(torch.randint(4, 20, (1,), generator=g))
        ids = torch.randint(1, 61, (length,), generator=g).tolist()
        k = int(torch.randint(1, length - 1, (1,), generator=g))
        item = Encoded(ids, [-100] * k + ids[k:])
        if visual_dim and j % 3:
            item.visual, item.has_image = torch.randn(visual_dim, generator=g), True
        items.append(item)
    return items


def recipe_for(items, pack, visual_dim=0, **kw):
    model = adapter(**({"visual_dim": visual_dim} if visual_dim else {}))
    args = TrainArgs(pack=pack, batch_size=4, lr=1e-2, warmup_steps=0, epochs=1, **kw)
    recipe = Recipe(args, progress=False)
    recipe.use(model, items, [], pad_id=0, make_ctx=visual_make_ctx(model) if visual_dim else None)
    recipe.setup_optimizer()
    return recipe


def loss_and_grads(recipe, batches):
    model = recipe.model
    model.zero_grad()
    total, n = 0.0, 0
    for b in batches:
        loss, k = token_loss_sum(model, b, recipe.make_ctx(b) if recipe.make_ctx else None)
        loss.backward()
        total, n = total + loss.item(), n + k
    return total, n, grads(model)


@pytest.mark.parametrize("visual_dim", [0, 8], ids=["text", "image"])
def test_trainer_packed_loss_and_grads_equal_unpacked(visual_dim):
    """The recipe's packed micro-batch (collate_packed: one row, first label of each example masked,
    per-example image prompts in row order) gives the loss and gradients of the same examples padded
    and of the examples one at a time; and a packed step equals a padded step over them."""
    items = encoded(12, visual_dim)
    packed_recipe = recipe_for(items, pack=True, visual_dim=visual_dim)
    padded_recipe = recipe_for(items, pack=False, visual_dim=visual_dim)
    step = packed_recipe._epoch_batches()[0]
    assert len(step) == 1 and len(step[0]) > 2  # one process, no accumulation: one packed row
    chosen = [items[i] for i in step[0]]
    batch = packed_recipe.batch(chosen)
    assert batch["input_ids"].shape == (1, sum(len(it.input_ids) for it in chosen)) and pad_fraction(batch) == 0
    if visual_dim:
        assert batch["has_image"].tolist() == [it.has_image for it in chosen]
    got = loss_and_grads(packed_recipe, [batch])
    for want in (
        loss_and_grads(padded_recipe, [padded_recipe.batch(chosen)]),
        loss_and_grads(padded_recipe, [padded_recipe.batch([it]) for it in chosen]),
    ):
        assert got[1] == want[1] == sum(target_count(it) for it in chosen)
        torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(want[0]), atol=1e-5, rtol=1e-5)
        assert got[2].keys() == want[2].keys() and got[2]
        for n in want[2]:
            torch.testing.assert_close(got[2][n], want[2][n], atol=1e-5, rtol=1e-4, msg=n)
    mean_packed, mean_padded = packed_recipe.step(step), padded_recipe.step(step)
    assert abs(mean_packed - mean_padded) < 1e-5 and abs(mean_packed - got[0] / got[1]) < 1e-5
    for (n, p), q in zip(packed_recipe.model.named_parameters(), padded_recipe.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


def test_a_step_with_fewer_examples_than_micro_batches_still_runs_every_micro_batch():
    """4 micro-batches (accumulation) and a step of 2 long examples: the empty micro-batches are one
    pad token without a target, so each micro-step (and each process of a run) does the same work."""
    items = encoded(8)
    recipe = recipe_for(items, pack=True, grad_accum=4, batch_tokens=10**6)
    empty = collate_packed([[], []], pad_id=0)
    assert empty["input_ids"].tolist() == [[0]] and empty["labels"].tolist() == [[-100]]
    assert empty["lengths"].tolist() == [0]
    assert token_loss_sum(recipe.model, empty)[1] == 0
    two = [[0], [5], [], []]
    mean = recipe.step(two)
    want = sum(loss_sum(adapter(), torch.tensor([items[i].input_ids]), torch.tensor([items[i].labels])).item()
               for i in (0, 5)) / sum(target_count(items[i]) for i in (0, 5))  # fmt: skip
    assert abs(mean - want) < 1e-5 and recipe.state.tokens == len(items[0].input_ids) + len(items[5].input_ids)
