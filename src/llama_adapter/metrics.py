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

Short-answer metrics, as the benchmarks' own scripts compute them:
- `normalize_vqa_answer` / `vqa_accuracy`: the VQA (and TextVQA) evaluation: punctuation,
  lowercase, number words to digits, articles dropped, contractions restored; accuracy
  min(1, #matching human answers / 3), averaged over the leave-one-out subsets of the answers;
- `mme_yes_no` / `mme_scores`: MME's yes/no parsing and its per-subtask accuracy, accuracy+ (both
  questions of an image right) and score = acc + acc+ in percent (at most 200 per subtask).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

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


# ------------------------------------------------------------------------------------- VQA accuracy
# The tables and regular expressions of the official VQA evaluation (vqaEval.py), kept as they are
# (the lookbehind of the period rule is written "(?!<=" there, so it only looks ahead).
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBER_WORDS["none"] = "0"
_ARTICLES = ("a", "an", "the")
_VQA_CONTRACTIONS = dict(
    pair.split("=")
    for pair in """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
    couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've
    hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's
    Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll
    let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've
    mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at
    'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
    shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
    somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
    someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's
    somethingd=something'd somethingd've=something'd've something'dve=something'd've somethingll=something'll
    thats=that's thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's
    theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
    wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's
    whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've
    who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't
    wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll
    y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
    you'dve=you'd've youll=you'll youre=you're youve=you've
""".split()
)


def normalize_vqa_answer(text: str) -> str:
    """An answer as the VQA evaluation compares it: "The Two dogs." -> "2 dogs"."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    strip_all = _COMMA_STRIP.search(text) is not None
    for p in _VQA_PUNCT:
        # Punctuation next to a space (or any in a text holding "1,000") goes; inside a word it splits it.
        out = out.replace(p, "" if strip_all or p + " " in text or " " + p in text else " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction. With the 10 human answers of VQA / TextVQA (any n >= 4):
    the mean over the n leave-one-out subsets of min(1, #answers equal to the prediction / 3).
    With fewer answers (a generated set has one) the rule cannot reach 1, so it is exact match:
    1.0 if the normalised prediction equals any normalised answer."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    if len(gts) < 4:
        return float(pred in gts)
    hits = [g == pred for g in gts]
    total = sum(hits)
    return sum(min(1.0, (total - h) / 3) for h in hits) / len(gts)


# ----------------------------------------------------------------------------------------------- MME
def mme_yes_no(text: str) -> str:
    """ "yes", "no" or "other", as MME's calculation.py reads a model's answer: the whole answer, or
    else "yes" / "no" within its first four characters (so "Yes, there is..." counts)."""
    t = text.strip().lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per subtask, from records {"subtask", "image" (the pair key), "correct"}: questions, images,
    acc (% of questions right), acc_plus (% of images with every question right) and score =
    acc + acc_plus (at most 200)."""
    by_task: dict[str, dict[Any, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_task[r["subtask"]][r["image"]].append(bool(r["correct"]))
    out = {}
    for task in sorted(by_task):
        images = by_task[task]
        answers = [c for cs in images.values() for c in cs]
        acc = 100.0 * sum(answers) / len(answers)
        acc_plus = 100.0 * sum(all(cs) for cs in images.values()) / len(images)
        out[task] = {
            "questions": len(answers),
            "images": len(images),
            "acc": acc,
            "acc_plus": acc_plus,
            "score": acc + acc_plus,
        }
    return out
