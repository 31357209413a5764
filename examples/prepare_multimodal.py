"""Prepare multimodal training data: Flickr8k-1k captions (fixed 900/100 split) and easy-VQA as
image-text JSONL, with image features precomputed in an on-disk cache.

    python examples/prepare_multimodal.py --flickr ../shared/data/flickr8k_1k --out data/mm \
        --image-encoder efficientnet-lite0

Writes data/mm/flickr/{train,val}.jsonl, data/mm/easyvqa/{train,test}.jsonl and data/mm/features/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llama_adapter.multimodal import (
    FeatureCache,
    easyvqa_to_jsonl,
    flickr8k_to_jsonl,
    load_image_encoder,
    load_image_examples,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flickr", default="../shared/data/flickr8k_1k", help="folder with captions.csv and images/")
    ap.add_argument("--out", default="data/mm")
    ap.add_argument("--image-encoder", default="efficientnet-lite0")
    ap.add_argument("--image-encoder-weights", default=None, help="local CLIP checkpoint for clip-* encoders")
    ap.add_argument("--no-easyvqa", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    enc = load_image_encoder(args.image_encoder, args.image_encoder_weights)
    cache = FeatureCache(out / "features", enc)
    files = list(flickr8k_to_jsonl(Path(args.flickr) / "captions.csv", Path(args.flickr) / "images", out / "flickr"))
    if not args.no_easyvqa:
        files += easyvqa_to_jsonl(out / "easyvqa")
    for f in files:
        images = sorted({e["image"] for e in load_image_examples(f) if e["image"]})
        t = time.perf_counter()
        feats = cache.get(images)
        dt = time.perf_counter() - t
        print(f"{f}: {len(images)} images -> features {tuple(feats.shape)} in {dt:.1f}s", file=sys.stderr)
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
