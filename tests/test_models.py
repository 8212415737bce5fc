import pytest
import torch

from regprune import UserError, create_model, list_models
from regprune.counting import count_macs, count_params
from regprune.models import PadShortcut
import torch.nn.functional as F


def test_resnet56_published_size():
    m = create_model("resnet56", num_classes=10)
    assert round(count_params(m) / 1e6, 2) == 0.85
    assert round(count_macs(m, torch.randn(1, 3, 32, 32)) / 1e6, 2) == 125.49


def test_torchvision_resnet50_published_size():
    m = create_model("torchvision.resnet50", num_classes=1000)
    assert round(count_params(m) / 1e6, 2) == 25.56
    assert round(count_macs(m, torch.randn(1, 3, 224, 224)) / 1e9, 2) == 4.09


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg11", "vgg13", "vgg16", "vgg19"])
def test_cifar_models_forward(name):
    m = create_model(name, num_classes=7, in_channels=1)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    assert m.regprune_arch == {"name": name, "kwargs": {"num_classes": 7, "in_channels": 1}}


def test_option_b_has_conv_shortcuts_and_more_params():
    a = create_model("resnet20", shortcut="A")
    b = create_model("resnet20", shortcut="B")
    assert count_params(b) > count_params(a)
    assert not any(isinstance(x, PadShortcut) for x in b.modules())


def test_pad_shortcut_equals_papers_option_a():
    s = PadShortcut(16, 32, 2)
    x = torch.randn(2, 16, 8, 8)
    ref = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    assert torch.equal(s(x), ref)


def test_list_models_and_patterns():
    names = list_models()
    assert "resnet56" in names and "vgg19" in names and "torchvision.resnet50" in names
    assert list_models("torchvision.mobilenet*") == [n for n in names if n.startswith("torchvision.mobilenet")]
    assert all(n.startswith("vgg") for n in list_models("vgg*"))


def test_torchvision_in_channels_and_classes():
    m = create_model("torchvision.resnet18", num_classes=10, in_channels=1)
    assert m(torch.randn(1, 1, 64, 64)).shape == (1, 10)


def test_unknown_model_is_user_error():
    with pytest.raises(UserError, match="unknown model"):
        create_model("resnet57")
    with pytest.raises(UserError):
        create_model("torchvision.nope")
