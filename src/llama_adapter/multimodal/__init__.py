"""Multimodal LLaMA-Adapter (paper section 3.3) and ImageBind-style binding: frozen encoders, their
cached embeddings, image-text data, and the wiring into training and generation.

A frozen image encoder turns an image into several global feature vectors taken at different depths
("multi-scale"), concatenated to `[B, sum(feature_dims)]`; the adapter's learnable projection
(`adapter.VisualProjection`, one MLP shared by all adapted layers, as in the paper) maps them to the
model width and adds them to every adapted layer's prompts. The gates start at zero, so at step 0
the model computes exactly what the frozen text model does, image or not. Other modalities are
bound to the image space (bind.py) and reach the model through the adapter's bind network.

One module per job, dependencies pointing down the list:

    images.py        open and convert image files, the encoders' resize/crop transforms
    weights.py       read and check encoder weight files, file sha256
    embeddings.py    the `Embedder` interface of every modality, batching, the per-file embedding cache
    base.py          `ImageEncoder`: what every image architecture implements
    efficientnet.py  EfficientNet-Lite0 (pip-shipped ImageNet weights)
    clip.py          CLIP / open_clip ViT visual towers (local weights), `clip-tiny` for tests
    encoders.py      image encoders by name: `load_image_encoder`, `get_image_encoder`
    features.py      image features per file / example / call, `visual_config`, training `make_ctx`
    datasets.py      image-text JSONL, Flickr8k and easy-VQA converters
    audio.py         mp3 decoding, log-mel, the pretrained aisfx audio encoder
    bind.py          binding any modality's embeddings to the image space (InfoNCE), recall, cache model

A new image architecture is a module beside efficientnet.py plus one line in encoders.py; a new
modality (video, point clouds) is a module beside audio.py whose encoder is an `Embedder`, so
`embed_files` caches it and bind.py binds it like audio.
"""

from .audio import EMBED_DIM, AisfxEncoder, decode_audio, embed_audio_files, log_mel, mel_filterbank, resample
from .base import CACHE_VERSION, ImageEncoder
from .bind import BindProjection, EmbeddingSpace, cache_enhance, info_nce, recall_at_k, to_sphere, train_bind_projection
from .clip import (
    CLIP_CONFIGS,
    CLIP_MEAN,
    CLIP_STD,
    ClipVisionConfig,
    ClipVisionTransformer,
    ClipViTEncoder,
    clip_visual_state_dict,
)
from .datasets import (
    CAPTION_INSTRUCTION,
    VQA_SUFFIX,
    easyvqa_to_jsonl,
    flickr8k_to_jsonl,
    load_any_examples,
    load_image_examples,
)
from .efficientnet import LITE0_STAGES, TF_EDGE_MEAN, TF_EDGE_STD, EfficientNetLite0, EfficientNetLite0Encoder
from .embeddings import Embedder, EmbeddingCache, embed_files
from .encoders import ENCODER_NAMES, get_image_encoder, load_image_encoder
from .features import (
    FeatureCache,
    example_features,
    example_visuals,
    image_features_for,
    uses_tokens,
    visual_config,
    visual_make_ctx,
)
from .images import MAX_IMAGE_PIXELS, crop_padded_resize, open_image, resize_center_crop, to_rgb
from .weights import check_state_dict, file_digest, read_state_dict

__all__ = [
    "CACHE_VERSION",
    "CAPTION_INSTRUCTION",
    "CLIP_CONFIGS",
    "CLIP_MEAN",
    "CLIP_STD",
    "EMBED_DIM",
    "ENCODER_NAMES",
    "LITE0_STAGES",
    "MAX_IMAGE_PIXELS",
    "TF_EDGE_MEAN",
    "TF_EDGE_STD",
    "VQA_SUFFIX",
    "AisfxEncoder",
    "BindProjection",
    "ClipViTEncoder",
    "ClipVisionConfig",
    "ClipVisionTransformer",
    "EfficientNetLite0",
    "EfficientNetLite0Encoder",
    "Embedder",
    "EmbeddingCache",
    "EmbeddingSpace",
    "FeatureCache",
    "ImageEncoder",
    "cache_enhance",
    "check_state_dict",
    "clip_visual_state_dict",
    "crop_padded_resize",
    "decode_audio",
    "easyvqa_to_jsonl",
    "embed_audio_files",
    "embed_files",
    "example_features",
    "example_visuals",
    "file_digest",
    "flickr8k_to_jsonl",
    "get_image_encoder",
    "image_features_for",
    "info_nce",
    "load_any_examples",
    "load_image_encoder",
    "load_image_examples",
    "log_mel",
    "mel_filterbank",
    "open_image",
    "read_state_dict",
    "recall_at_k",
    "resample",
    "resize_center_crop",
    "to_rgb",
    "to_sphere",
    "train_bind_projection",
    "uses_tokens",
    "visual_config",
    "visual_make_ctx",
]
