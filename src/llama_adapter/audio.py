"""Moved to `llama_adapter.multimodal.audio` (decoding, log-mel, the aisfx encoder) and
`llama_adapter.multimodal.bind` (binding to the image space); this name keeps old imports working."""

from .multimodal.audio import (  # noqa: F401
    EMBED_DIM,
    SAMPLE_RATE,
    AisfxEncoder,
    decode_audio,
    embed_audio_files,
    log_mel,
    mel_filterbank,
    resample,
)
from .multimodal.bind import (  # noqa: F401
    BindProjection,
    EmbeddingSpace,
    cache_enhance,
    info_nce,
    recall_at_k,
    to_sphere,
    train_bind_projection,
)
