"""models: shapes, single channel, ResNet-50 stem, pretrained weights from local files only."""

import pytest
import torch
import torchvision

from d3m_lib import models
from d3m_lib.models import build_model, count_params, resnet9, resnet50


@pytest.mark.parametrize("px", [24, 32])
def test_resnet9_shapes(px):
    m = resnet9(num_outputs=3, width=4).eval()
    assert m(torch.zeros(2, 1, px, px)).shape == (2, 3)
    assert m[0][0].in_channels == 1
    # widths w, 2w, 4w, 8w
    convs = [mod.out_channels for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert sorted(set(convs)) == [4, 8, 16, 32]


def test_width_changes_param_count():
    assert count_params(resnet9(width=8)) > count_params(resnet9(width=4))


def test_resnet50_single_channel():
    m = resnet50(num_outputs=14).eval()
    assert m.conv1.in_channels == 1
    assert m(torch.zeros(1, 1, 64, 64)).shape == (1, 14)


def test_unknown_arch():
    with pytest.raises(ValueError, match="arch"):
        build_model("vgg")


def test_pretrained_missing_file_says_no_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="No downloads"):
        build_model("resnet50", pretrained=tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="No downloads"):
        build_model("resnet50", pretrained="imagenet_weights")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network (D3M_OFFLINE=1: nothing is ever downloaded) and an empty torch hub cache."""
    monkeypatch.setenv(models.OFFLINE_ENV, "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(models.IMAGENET_ENV, raising=False)
    monkeypatch.setattr(models.socket, "create_connection", _no_network)
    return tmp_path / "torch_home" / "hub" / "checkpoints" / models.IMAGENET_FILE


def _no_network(*a, **k):
    raise AssertionError("a test tried to reach the network")


def test_imagenet_without_network_or_file_is_refused_with_instructions(offline):
    problem = models.imagenet_problem("resnet50")
    assert "cannot be downloaded" in problem and models.OFFLINE_ENV in problem
    assert str(offline) in problem and models.IMAGENET_ENV in problem and "pretrained: /path/to/" in problem
    with pytest.raises(FileNotFoundError, match="no local copy"):
        build_model("resnet50", pretrained="imagenet")
    assert "arch" in models.imagenet_problem("resnet9")
    with pytest.raises(ValueError, match="ImageNet ResNet-50"):
        build_model("resnet9", pretrained="imagenet")


def test_imagenet_reads_the_hub_cache_file_or_the_env_file(offline, monkeypatch):
    torch.manual_seed(0)
    rgb = torchvision.models.resnet50(weights=None)
    offline.parent.mkdir(parents=True)
    torch.save(rgb.state_dict(), offline)   # where torchvision's weights API caches IMAGENET1K_V2
    assert models.imagenet_file() == offline and models.imagenet_problem("resnet50") is None
    m = build_model("resnet50", num_outputs=1, pretrained="imagenet")
    assert torch.allclose(m.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    other = offline.parent / "elsewhere.pth"
    offline.rename(other)
    monkeypatch.setenv(models.IMAGENET_ENV, str(other))
    assert models.imagenet_problem("resnet50") is None
    assert torch.equal(build_model("resnet50", pretrained="imagenet").layer1[0].conv1.weight,
                       rgb.layer1[0].conv1.weight)
    monkeypatch.setenv(models.IMAGENET_ENV, str(offline))   # named but absent
    assert "names no file" in models.imagenet_problem("resnet50")


def test_imagenet_download_uses_torchvisions_weights_api(offline, monkeypatch):
    """With network (simulated) the weights come through ResNet50_Weights; nothing is fetched here."""
    monkeypatch.delenv(models.OFFLINE_ENV)
    monkeypatch.setattr(models, "can_download", lambda timeout=2.0: True)
    rgb = torchvision.models.resnet50(weights=None)
    calls = []

    def fake_get_state_dict(self, *a, **k):
        calls.append(self)
        return rgb.state_dict()

    monkeypatch.setattr(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.__class__, "get_state_dict",
                        fake_get_state_dict)
    m = build_model("resnet50", pretrained="imagenet")
    assert calls == [torchvision.models.ResNet50_Weights.IMAGENET1K_V2]
    assert torch.allclose(m.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))


def test_pretrained_imagenet_style_file_is_adapted(tmp_path):
    torch.manual_seed(0)
    rgb = torchvision.models.resnet50(weights=None)  # 3-channel stem, 1000-way fc
    path = tmp_path / "r50.pt"
    torch.save(rgb.state_dict(), path)
    m = build_model("resnet50", num_outputs=1, pretrained=path)
    assert torch.allclose(m.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(m.layer4[2].conv3.weight, rgb.layer4[2].conv3.weight)
    assert m.fc.out_features == 1
    # a grey image as R=G=B gives the same stem output as the summed 1-channel conv
    x = torch.rand(1, 1, 32, 32)
    assert torch.allclose(rgb.conv1(x.repeat(1, 3, 1, 1)), m.conv1(x), atol=1e-5)


def test_pretrained_resnet9_roundtrip_and_bad_key(tmp_path):
    src = resnet9(num_outputs=5, width=4)
    path = tmp_path / "r9.pt"
    torch.save(src.state_dict(), path)
    m = build_model("resnet9", num_outputs=1, width=4, pretrained=path)
    assert torch.equal(m[0][0].weight, src[0][0].weight)
    sd = src.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(ValueError, match="extra.weight"):
        build_model("resnet9", width=4, pretrained=path)
    with pytest.raises(ValueError, match="shape"):
        torch.save(resnet9(width=8).state_dict(), path)
        build_model("resnet9", width=4, pretrained=path)
