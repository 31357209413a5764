"""The OpenAI request format: parsing and checking request bodies into what the scheduler takes,
and errors shaped as OpenAI returns them. No model, no HTTP framework here."""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..multimodal import MAX_IMAGE_PIXELS, open_image, to_rgb
from .scheduler import Sampling


class APIError(Exception):
    """An OpenAI-shaped error response."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ServeOptions:
    api_key: str | None = None
    max_body_bytes: int = 8 << 20  # room for one base64 image
    local_image_root: str | None = None  # image_url may name files under this directory
    default_max_tokens: int = 256
    retry_after_s: int = 1


def _number(body: dict, key: str, default: Any, lo: float, hi: float, integer: bool = False) -> Any:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or (integer and not isinstance(v, int)):
        raise APIError(400, f"'{key}' must be a{'n integer' if integer else ' number'}, got {v!r}", param=key)
    if not lo <= v <= hi:
        raise APIError(400, f"'{key}'={v} is out of range [{lo}, {hi}]", param=key)
    return v


def parse_sampling(body: dict, default_max_tokens: int) -> Sampling:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, default_max_tokens, 1, 1 << 30, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)) or len(stop) > 4:
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    return Sampling(
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0)),
        top_k=_number(body, "top_k", None, 0, 1 << 30, integer=True) or None,
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 0.01, 100.0)),
        stop=stop,
        seed=_number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
        ignore_eos=bool(body.get("ignore_eos", False)),
    )


def load_image_url(url: str, local_root: str | None) -> Any:
    """An image_url: a base64 data: URL, or (only when the server allows it) a file under one directory."""
    if url.startswith(("http://", "https://")):
        raise APIError(400, "remote image URLs are not fetched; send a data: URL", param="image_url")
    if not url.startswith("data:"):
        if local_root is None:
            raise APIError(
                400,
                "local image paths are disabled; send a data: URL or start the server with --allow-local-images DIR",
                param="image_url",
            )
        root = Path(local_root).resolve()
        path = (root / Path(url.removeprefix("file://")).expanduser()).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise APIError(400, f"image {url!r} is not a file under the allowed directory", param="image_url")
        try:
            return open_image(path)
        except ValueError as e:
            raise APIError(400, str(e), param="image_url") from e
    header, _, payload = url.partition(",")
    if ";base64" not in header or not header[5:].startswith("image/"):
        raise APIError(400, "image data URLs must look like data:image/<type>;base64,<data>", param="image_url")
    try:
        data = base64.b64decode(payload, validate=True)
        with Image.open(io.BytesIO(data)) as im:
            if im.size[0] * im.size[1] > MAX_IMAGE_PIXELS:
                raise APIError(400, f"image is {im.size[0]}x{im.size[1]} pixels; downscale it", param="image_url")
            im.load()
            return to_rgb(im)
    except (binascii.Error, ValueError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise APIError(400, f"could not decode the image data URL ({type(e).__name__}: {e})", param="image_url") from e


def parse_messages(body: dict, local_root: str | None) -> tuple[list[dict[str, str]], Any]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out, images = [], []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise APIError(400, "each message needs a role of system, user or assistant", param="messages")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url":
                    iu = part.get("image_url")
                    url = iu.get("url") if isinstance(iu, dict) else iu
                    if not isinstance(url, str):
                        raise APIError(400, "image_url parts need {'url': ...}", param="messages")
                    images.append(load_image_url(url, local_root))
                else:
                    raise APIError(400, f"unsupported content part {kind!r}; use text or image_url", param="messages")
            content = "\n".join(texts)
        if not isinstance(content, str):
            raise APIError(400, "message content must be a string or a list of parts", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    if len(images) > 1:
        raise APIError(400, "at most one image per request is supported", param="messages")
    return out, images[0] if images else None


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
