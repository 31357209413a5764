import csv
import math
import shutil
from collections import defaultdict

import pytest
from helpers import FLICKR

from llama_adapter.metrics import bleu4, caption_scores, cider_d, corpus_bleu, tokenize

CAPTIONS = FLICKR / "captions.csv"


def test_tokenize_like_coco_ptb():
    assert tokenize("A dog's ball, isn't it?") == ["a", "dog", "'s", "ball", "is", "n't", "it"]
    assert tokenize("Two men in T-shirts (smiling) .") == ["two", "men", "in", "t-shirts", "smiling"]


def test_bleu_identical_is_one():
    refs = {1: ["a dog runs on the grass"], 2: ["two people walk down a street"]}
    cands = {k: [v[0]] for k, v in refs.items()}
    assert bleu4(cands, refs) == pytest.approx(1.0, abs=1e-9)


def test_bleu_hand_computed():
    # p1 = 4/5, p2 = 3/4, p3 = 2/3, p4 = 1/2, no brevity penalty
    b = corpus_bleu(["a b c d e"], [["a b c d f"]])
    assert b[3] == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, rel=1e-9)
    # Brevity penalty: 2 words against a 4-word reference -> exp(1 - 4/2)
    b = corpus_bleu(["a b"], [["a b c d"]], n=2)
    assert b[1] == pytest.approx(math.exp(1 - 2), rel=1e-6)
    # "closest" reference length: the 5-word reference is picked, no penalty
    assert corpus_bleu(["a b c d e"], [["a b c d e f g h i", "a b c d e"]])[3] == pytest.approx(1.0)


def test_cider_properties():
    refs = {
        i: [f"a {w} runs on the grass", f"the {w} is running on grass"] for i, w in enumerate(["dog", "cat", "man"])
    }
    perfect = {i: [r[0]] for i, r in refs.items()}
    wrong = {i: ["a red car parked near a building"] for i in refs}
    assert cider_d(perfect, refs) > cider_d(wrong, refs) == pytest.approx(0.0)
    mean, per = cider_d(perfect, refs, return_per_image=True)
    assert len(per) == 3 and mean == pytest.approx(sum(per) / 3)


def _flickr_case(n_images=200):
    caps = defaultdict(list)
    with open(CAPTIONS, newline="") as f:
        for r in csv.DictReader(f):
            caps[r["image"]].append(r["caption"])
    names = sorted(caps)[:n_images]
    # Two thirds of the candidates are the image's own first caption, a third another image's.
    cands = {n: [caps[names[(i + (0 if i % 3 else 1)) % len(names)]][0]] for i, n in enumerate(names)}
    refs = {n: caps[n][1:] for n in names}
    return cands, refs


@pytest.mark.skipif(not CAPTIONS.is_file(), reason="shared Flickr8k captions not present")
def test_matches_coco_caption_reference_values():
    # Values computed with pycocoevalcap 1.2 (PTBTokenizer + Bleu(4) + Cider) on this exact case.
    cands, refs = _flickr_case()
    s = caption_scores(cands, refs)
    assert s["bleu1"] == pytest.approx(0.5541373239434181, abs=1e-12)
    assert s["bleu4"] == pytest.approx(0.17554690717087212, abs=1e-12)
    assert s["cider"] == pytest.approx(0.6155376039964101, abs=1e-12)


@pytest.mark.skipif(not CAPTIONS.is_file(), reason="shared Flickr8k captions not present")
def test_against_pycocoevalcap_if_installed():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    cands, refs = _flickr_case(120)
    if shutil.which("java"):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        ptb = PTBTokenizer()
        tc = ptb.tokenize({k: [{"caption": c} for c in v] for k, v in cands.items()})
        tr = ptb.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
        for k in tr:  # our pure-Python tokenisation equals the Java PTB tokenizer's
            assert [" ".join(tokenize(c)) for c in refs[k]] == tr[k]
    else:
        tc = {k: [" ".join(tokenize(c)) for c in v] for k, v in cands.items()}
        tr = {k: [" ".join(tokenize(c)) for c in v] for k, v in refs.items()}
    b, _ = Bleu(4).compute_score(tr, tc, verbose=0)
    c, _ = Cider().compute_score(tr, tc)
    assert corpus_bleu(tc, tr, tokenized=True) == pytest.approx(b, abs=1e-12)
    assert cider_d(tc, tr, tokenized=True) == pytest.approx(c, abs=1e-12)


def test_bad_inputs():
    with pytest.raises(ValueError, match="same image ids"):
        bleu4({1: ["a"]}, {2: ["a"]})
    with pytest.raises(ValueError, match="exactly one"):
        cider_d({1: ["a", "b"]}, {1: ["a"]})
    with pytest.raises(ValueError, match="at least one reference"):
        bleu4(["a"], [[]])
