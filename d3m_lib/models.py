"""Single-channel classifiers: ResNet-9 (width parameter) and torchvision's ResNet-50.

``build_model(arch, ...)`` is the one entry point the training code uses.
Pretrained weights (parameter ``pretrained``) come from a local ``state_dict``
file, or, for ResNet-50, ``"imagenet"``: torchvision's ImageNet weights
(``ResNet50_Weights.IMAGENET1K_V2``), adapted to one input channel. Those are
read from a local file when there is one (:func:`imagenet_file`: the file named
by ``$D3M_RESNET50_IMAGENET``, else ``resnet50-11ad3fa6.pth`` in torch's hub
cache, ``$TORCH_HOME/hub/checkpoints/``); only without one are they downloaded
through torchvision's weights API, and only when download.pytorch.org answers
and ``$D3M_OFFLINE`` is not ``1``. :func:`imagenet_problem` says, before any work
(the configuration check calls it), why neither is possible and how to provide
the file. Nothing else is ever downloaded.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
from torch import nn
import torchvision

ARCHS = ("resnet9", "resnet50")

_NO_DOWNLOAD = (
    "No downloads are made for a path. Provide the weights as a local state_dict file and pass "
    "its path as the `pretrained` parameter (e.g. on a machine with network access run "
    "`torch.save(torchvision.models.resnet50(weights='IMAGENET1K_V2').state_dict(), "
    "'resnet50_imagenet.pt')` and copy the file here), or use `pretrained: imagenet` for "
    "torchvision's ImageNet ResNet-50 weights."
)


IMAGENET = "imagenet"   # the `pretrained` value for torchvision's ImageNet ResNet-50 weights
IMAGENET_FILE = "resnet50-11ad3fa6.pth"   # ResNet50_Weights.IMAGENET1K_V2's file name in torch's hub cache
IMAGENET_ENV = "D3M_RESNET50_IMAGENET"    # a local copy of that file, anywhere
OFFLINE_ENV = "D3M_OFFLINE"               # "1": never try to download the ImageNet weights
_DOWNLOAD_HOST = ("download.pytorch.org", 443)


def imagenet_file() -> Path | None:
    """The local ImageNet ResNet-50 weights: ``$D3M_RESNET50_IMAGENET`` if set, else the torch hub cache.

    The hub cache file is ``<torch.hub.get_dir()>/checkpoints/resnet50-11ad3fa6.pth``
    (``$TORCH_HOME/hub/checkpoints/`` when ``TORCH_HOME`` is set, by default
    ``~/.cache/torch/hub/checkpoints/``), where torchvision's weights API itself puts it.
    None when the environment variable is unset and the cache holds no such file; the
    path named by the variable is returned even when it does not exist (the check says so).
    """
    env = os.environ.get(IMAGENET_ENV)
    if env:
        return Path(env).expanduser()
    import torch.hub

    f = Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILE
    return f if f.is_file() else None


def can_download(timeout: float = 2.0) -> bool:
    """Whether the ImageNet weights could be downloaded now: ``$D3M_OFFLINE`` unset and the host answers."""
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        return False
    try:
        socket.create_connection(_DOWNLOAD_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


def imagenet_instructions() -> str:
    """How to provide the ImageNet ResNet-50 weights file without network access."""
    import torch.hub

    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return (f"Provide torchvision's ResNet-50 ImageNet weights as a local file: on a machine with network "
            f"access run `python -c \"import torchvision; torchvision.models.resnet50(weights='IMAGENET1K_V2')\"` "
            f"(it saves {IMAGENET_FILE} in its torch hub cache, ~/.cache/torch/hub/checkpoints/), or download "
            f"https://download.pytorch.org/models/{IMAGENET_FILE}; then copy the file to {cache / IMAGENET_FILE} "
            f"(this machine's $TORCH_HOME/hub/checkpoints/), or set {IMAGENET_ENV}=/path/to/{IMAGENET_FILE}, "
            f"or pass the file itself: `pretrained: /path/to/{IMAGENET_FILE}` (any ResNet-50 state_dict works)")


def imagenet_problem(arch: str = "resnet50", probe: bool = True) -> str | None:
    """Why ``pretrained: imagenet`` cannot work here, or None. Cheap: no weights are read.

    OK when ``arch`` is resnet50 and a local file exists (:func:`imagenet_file`) or,
    with ``probe``, the download host answers (:func:`can_download`).
    """
    if arch != "resnet50":
        return (f"parameter 'pretrained' = 'imagenet' names torchvision's ImageNet ResNet-50 weights, but "
                f"'arch' is {arch!r}; use arch: resnet50, or pass a local state_dict file for {arch}")
    f = imagenet_file()
    if f is not None:
        if f.is_file():
            return None
        return (f"parameter 'pretrained' = 'imagenet': {IMAGENET_ENV}={os.environ.get(IMAGENET_ENV)!r} "
                f"names no file. {imagenet_instructions()}")
    if probe and can_download():
        return None
    why = (f"{OFFLINE_ENV}=1 forbids downloads" if os.environ.get(OFFLINE_ENV, "") not in ("", "0")
           else f"{_DOWNLOAD_HOST[0]} cannot be reached from here")
    return (f"parameter 'pretrained' = 'imagenet': no local copy of the weights was found and they cannot be "
            f"downloaded ({why}). {imagenet_instructions()}")


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


def body(model: nn.Module) -> nn.Module:
    """The model without its classification head: maps images to the last linear layer's input
    (shares the model's weights). DFR refits that layer."""
    if isinstance(model, torchvision.models.ResNet):
        return nn.Sequential(*list(model.children())[:-1], nn.Flatten())
    if isinstance(model, nn.Sequential):
        last = max(i for i, m in enumerate(model) if isinstance(m, nn.Linear))
        return model[:last]
    raise TypeError(f"no known head for {type(model).__name__}: expected resnet9 (Sequential) or a torchvision ResNet")


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
    return _load_state(model, state, path)


def load_imagenet(model: nn.Module) -> nn.Module:
    """torchvision's ImageNet ResNet-50 weights (IMAGENET1K_V2) into ``model``, one input channel.

    From the local file (:func:`imagenet_file`) when there is one, else through
    torchvision's weights API (a download into torch's hub cache); without either a
    ``FileNotFoundError`` that says how to provide the file.
    """
    problem = imagenet_problem("resnet50" if isinstance(model, torchvision.models.ResNet) else "resnet9")
    if problem:
        raise FileNotFoundError(problem)
    f = imagenet_file()
    if f is not None:
        return load_pretrained(model, f)
    state = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.get_state_dict(progress=False, check_hash=True)
    return _load_state(model, state, f"torchvision {IMAGENET_FILE}")


def _load_state(model: nn.Module, state, path) -> nn.Module:
    """Load a state_dict read from ``path`` into ``model`` (see :func:`load_pretrained`)."""
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
    init), ``"imagenet"`` (ResNet-50 only: :func:`load_imagenet`) or the path of a
    local state_dict file; any other name that is not a file is refused with
    instructions.
    """
    if arch == "resnet9":
        model = resnet9(num_outputs=num_outputs, width=width, in_channels=in_channels)
    elif arch == "resnet50":
        model = resnet50(num_outputs=num_outputs, in_channels=in_channels)
    else:
        raise ValueError(f"parameter `arch` must be one of {ARCHS}, got {arch!r}")
    if pretrained == IMAGENET:
        if arch != "resnet50":
            raise ValueError(imagenet_problem(arch))
        load_imagenet(model)
    elif pretrained not in (None, "", False):
        p = Path(str(pretrained))
        if not p.suffix and not p.exists():
            raise FileNotFoundError(f"`pretrained={pretrained!r}` names no local file. {_NO_DOWNLOAD}")
        load_pretrained(model, p)
    return model


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
