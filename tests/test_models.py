"""models: shapes, single channel, ResNet-50 stem, pretrained weights from local files only."""

import pytest
import torch
import torchvision

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
        build_model("resnet50", pretrained="imagenet")


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
