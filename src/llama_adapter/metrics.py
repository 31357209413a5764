"""Captioning metrics as computed by the coco-caption toolkit (pycocoevalcap), in pure Python.

- `tokenize`: the toolkit's PTB tokenisation, approximated without Java: lowercase, split off
  punctuation and PTB contractions ("dog's" -> "dog 's", "don't" -> "do n't"), drop the
  punctuation tokens the toolkit removes.
- `corpus_bleu`: BLEU-1..4 over the corpus (clipped n-gram counts and lengths summed over all
  captions, "closest" reference length for the brevity penalty, the toolkit's 1e-15 / 1e-9
  smoothing), which is what COCO leaderboards report as BLEU-4.
- `cider_d`: CIDEr-D: tf-idf n-gram vectors (n = 1..4, document frequencies over the reference
  sets of the evaluated images), clipped candidate weights, Gaussian length penalty sigma = 6,
  averaged over references and n, times 10.

Inputs are `{image_id: [caption]}` and `{image_id: [ref, ref, ...]}`, or parallel lists.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

# Tokens the coco-caption PTBTokenizer removes after tokenising.
PUNCTUATIONS = {
    "''",
    "'",
    "``",
    "`",
    "-lrb-",
    "-rrb-",
    "-lcb-",
    "-rcb-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    '"',
}
_CONTRACTIONS = re.compile(r"(?i)\b(\w+)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_SPLIT = re.compile(r"\.\.\.|--|n't\b|'\w*|[\w]+(?:[-/][\w]+)*|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens without punctuation, as the coco-caption PTB tokenizer gives."""
    text = text.lower().replace("\n", " ")
    text = _CONTRACTIONS.sub(lambda m: f"{m.group(1)} {m.group(2)}", text)
    text = re.sub(r'"', " '' ", text)
    return [t for t in _SPLIT.findall(text) if t not in PUNCTUATIONS]


def _ngrams(words: Sequence[str], n: int) -> Counter:
    c: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            c[tuple(words[i : i + k])] += 1
    return c


def _prepare(
    candidates: Mapping | Sequence, references: Mapping | Sequence, tokenized: bool
) -> tuple[list[list[str]], list[list[list[str]]]]:
    if isinstance(candidates, Mapping):
        if not isinstance(references, Mapping) or set(candidates) != set(references):
            raise ValueError("candidates and references must cover the same image ids")
        keys = sorted(candidates, key=str)
        cands = []
        for k in keys:
            c = candidates[k]
            if isinstance(c, str):
                c = [c]
            if len(c) != 1:
                raise ValueError(f"image {k!r}: need exactly one candidate caption, got {len(c)}")
            cands.append(c[0])
        refs = [list(references[k]) for k in keys]
    else:
        cands, refs = list(candidates), [list(r) for r in references]
        if len(cands) != len(refs):
            raise ValueError(f"{len(cands)} candidates but {len(refs)} reference sets")
    if not cands:
        raise ValueError("no captions to score")
    if any(not r for r in refs):
        raise ValueError("every image needs at least one reference caption")
    tok = (lambda s: s.split()) if tokenized else tokenize
    return [tok(c) for c in cands], [[tok(r) for r in rs] for rs in refs]


def corpus_bleu(
    candidates: Mapping | Sequence, references: Mapping | Sequence, n: int = 4, tokenized: bool = False
) -> list[float]:
    """[BLEU-1, ..., BLEU-n] of the corpus, as coco-caption's Bleu(n) with option 'closest'."""
    cands, refs = _prepare(candidates, references, tokenized)
    tiny, small = 1e-15, 1e-9
    guess = [0] * n
    correct = [0] * n
    test_len = ref_len = 0
    for c, rs in zip(cands, refs):
        maxref: Counter = Counter()
        for r in rs:
            for g, k in _ngrams(r, n).items():
                maxref[g] = max(maxref[g], k)
        cc = _ngrams(c, n)
        L = len(c)
        test_len += L
        ref_len += min((abs(len(r) - L), len(r)) for r in rs)[1]
        for k in range(n):
            guess[k] += max(L - k, 0)
        for g, k in cc.items():
            correct[len(g) - 1] += min(maxref.get(g, 0), k)
    bleus = []
    prod = 1.0
    for k in range(n):
        prod *= (correct[k] + tiny) / (guess[k] + small)
        bleus.append(prod ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        bleus = [b * math.exp(1 - 1 / ratio) for b in bleus]
    return bleus


def bleu4(candidates: Mapping | Sequence, references: Mapping | Sequence, tokenized: bool = False) -> float:
    return corpus_bleu(candidates, references, 4, tokenized)[-1]


def cider_d(
    candidates: Mapping | Sequence,
    references: Mapping | Sequence,
    n: int = 4,
    sigma: float = 6.0,
    tokenized: bool = False,
    return_per_image: bool = False,
) -> float | tuple[float, list[float]]:
    """Corpus CIDEr-D (mean over images), as coco-caption's Cider scorer."""
    cands, refs = _prepare(candidates, references, tokenized)
    ref_counts = [[_ngrams(r, n) for r in rs] for rs in refs]
    df: Counter = Counter()
    for rcs in ref_counts:
        for g in set(g for rc in rcs for g in rc):
            df[g] += 1
    log_n_docs = math.log(float(len(refs)))

    def vec(counts: Counter) -> tuple[list[dict], list[float], int]:
        v: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            w = float(tf) * (log_n_docs - math.log(max(1.0, df[g])))
            v[k][g] = w
            norm[k] += w * w
            if k == 1:
                length += tf  # the toolkit measures length in bigrams
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for c, rcs in zip(cands, ref_counts):
        vc, nc, lc = vec(_ngrams(c, n))
        total = [0.0] * n
        for rc in rcs:
            vr, nr, lr = vec(rc)
            delta = float(lc - lr)
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vc[k].items())
                if nc[k] != 0 and nr[k] != 0:
                    val /= nc[k] * nr[k]
                total[k] += val * math.exp(-(delta**2) / (2 * sigma**2))
        scores.append(sum(total) / n / len(rcs) * 10.0)
    mean = sum(scores) / len(scores)
    return (mean, scores) if return_per_image else mean


def caption_scores(candidates: Mapping | Sequence, references: Mapping | Sequence) -> dict[str, float]:
    """{"bleu1".."bleu4", "cider"} on coco-caption-tokenised captions."""
    b = corpus_bleu(candidates, references, 4)
    return {**{f"bleu{i + 1}": v for i, v in enumerate(b)}, "cider": cider_d(candidates, references)}
