"""Single-channel classifiers: ResNet-9 (width parameter) and torchvision's ResNet-50.

``build_model(arch, ...)`` is the one entry point the training code uses.
Pretrained weights can only come from a local ``state_dict`` file: these
machines cannot download anything, and credentialed runs must not try to.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
import torchvision

ARCHS = ("resnet9", "resnet50")

_NO_DOWNLOAD = (
    "No downloads are possible here. Provide the weights as a local state_dict file and pass "
    "its path as the `pretrained` parameter: e.g. on a machine with network access run "
    "`torch.save(torchvision.models.resnet50(weights='IMAGENET1K_V2').state_dict(), "
    "'resnet50_imagenet.pt')` and copy the file here."
)


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU: the ResNet-9 building block."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    """x + f(x)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


class _Scale(nn.Module):
    """Multiply by a constant (the DAWNBench ResNet-9 scales its logits by 1/8)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def resnet9(num_outputs: int = 1, width: int = 64, in_channels: int = 1) -> nn.Sequential:
    """The DAWNBench / TRAK ResNet-9 with channel widths w, 2w, 4w, 8w.

    prep conv(w) -> conv(2w), pool, residual(2 convs) -> conv(4w), pool ->
    conv(8w), pool, residual(2 convs) -> global max pool -> linear -> x 0.125.
    Works for any input size >= 8 px (three 2x poolings, then global pooling).
    """
    if width < 1 or num_outputs < 1 or in_channels < 1:
        raise ValueError(f"resnet9 needs positive width/num_outputs/in_channels, got "
                         f"width={width}, num_outputs={num_outputs}, in_channels={in_channels}")
    w = width
    return nn.Sequential(
        _conv_bn(in_channels, w),
        _conv_bn(w, 2 * w),
        nn.MaxPool2d(2),
        _Residual(nn.Sequential(_conv_bn(2 * w, 2 * w), _conv_bn(2 * w, 2 * w))),
        _conv_bn(2 * w, 4 * w),
        nn.MaxPool2d(2),
        _conv_bn(4 * w, 8 * w),
        nn.MaxPool2d(2),
        _Residual(nn.Sequential(_conv_bn(8 * w, 8 * w), _conv_bn(8 * w, 8 * w))),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(8 * w, num_outputs, bias=False),
        _Scale(0.125),
    )


def resnet50(num_outputs: int = 1, in_channels: int = 1) -> nn.Module:
    """torchvision ResNet-50 (random init) with an ``in_channels`` stem and ``num_outputs`` logits."""
    m = torchvision.models.resnet50(weights=None, num_classes=num_outputs)
    m.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return m


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict key prefixes of the classification head (dropped from pretrained weights)."""
    if isinstance(model, torchvision.models.ResNet):
        return ("fc.",)
    last = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)][-1]
    return (last + ".",)


def load_pretrained(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local state_dict into ``model``, adapting it to one input channel.

    - the classification head (``fc.*`` for ResNet-50, the last linear layer of
      ResNet-9) is dropped and keeps its random initialisation;
    - a first convolution with 3 input channels (ImageNet RGB) is summed over
      its channels when the model has 1 input channel: a grey image fed as
      R = G = B gives the same activations;
    - any other missing, unexpected or mis-shaped key is an error naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}. {_NO_DOWNLOAD}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state_dict (got {type(state).__name__})")
    head = _head_prefixes(model)
    own = model.state_dict()
    adapted = {}
    for key, value in state.items():
        if key.startswith(head):
            continue
        if key not in own:
            raise ValueError(f"pretrained file {path}: key '{key}' does not exist in the model")
        target = own[key]
        if value.shape != target.shape:
            if (value.ndim == 4 and target.ndim == 4 and target.shape[1] == 1
                    and value.shape[1] == 3 and value.shape[0] == target.shape[0]
                    and value.shape[2:] == target.shape[2:]):
                value = value.sum(dim=1, keepdim=True)
            else:
                raise ValueError(f"pretrained file {path}: key '{key}' has shape {tuple(value.shape)}, "
                                 f"the model expects {tuple(target.shape)}")
        adapted[key] = value
    missing = [k for k in own if k not in adapted and not k.startswith(head)]
    if missing:
        raise ValueError(f"pretrained file {path} lacks {len(missing)} model keys, e.g. {missing[:3]}")
    model.load_state_dict(adapted, strict=False)
    return model


def build_model(arch: str, num_outputs: int = 1, width: int = 64,
                pretrained: str | Path | None = None, in_channels: int = 1) -> nn.Module:
    """The model named by ``arch`` (``resnet9`` or ``resnet50``), optionally with local weights.

    ``width`` applies to ResNet-9 only. ``pretrained`` is ``None`` (random
    init) or the path of a local state_dict file; names such as ``"imagenet"``
    that would need a download are refused with instructions.
    """
    if arch == "resnet9":
        model = resnet9(num_outputs=num_outputs, width=width, in_channels=in_channels)
    elif arch == "resnet50":
        model = resnet50(num_outputs=num_outputs, in_channels=in_channels)
    else:
        raise ValueError(f"parameter `arch` must be one of {ARCHS}, got {arch!r}")
    if pretrained not in (None, "", False):
        p = Path(str(pretrained))
        if not p.suffix and not p.exists():
            raise FileNotFoundError(f"`pretrained={pretrained!r}` names no local file. {_NO_DOWNLOAD}")
        load_pretrained(model, p)
    return model


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
