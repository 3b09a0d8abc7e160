import pytest
import torch
from torch import nn

from distill.errors import DistillError
from distill.taps import Taps

pytestmark = pytest.mark.fast


def make_net():
    return nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 6), nn.ReLU()), nn.Linear(6, 3)
    )


def test_captures_outputs_and_inputs_by_dotted_path():
    net = make_net()
    x = torch.randn(5, 4)
    taps = Taps(net, ["0", "2.0", "3:input"])
    out = taps.run(net, x)
    assert torch.allclose(out["0"], net[0](x))
    hidden = net[1](net[0](x))
    assert torch.allclose(out["2.0"], net[2][0](hidden))
    assert torch.allclose(out["3:input"], net[2](hidden))
    assert torch.allclose(out["logits"], net(x))


def test_hooks_are_removed_and_model_unchanged():
    net = make_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    taps = Taps(net, ["2.0"])
    taps.run(net, torch.randn(2, 4))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_captured_tensors_keep_the_graph():
    net = make_net()
    out = Taps(net, ["2.0"]).run(net, torch.randn(3, 4))
    out["2.0"].sum().backward()
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0


def test_unknown_tap_names_nearest():
    net = nn.Sequential()
    net.add_module("layer1", nn.Linear(2, 2))
    net.add_module("layer2", nn.Linear(2, 2))
    net.add_module("layer3", nn.Linear(2, 2))
    with pytest.raises(DistillError) as err:
        Taps(net, ["layer5"], owner="student")
    msg = str(err.value)
    assert "unknown tap 'layer5' on student" in msg and "layer" in msg.split("nearest:")[1]


def test_tap_on_module_that_does_not_run():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(2, 2)
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    net = Branchy()
    with pytest.raises(DistillError, match="captured nothing"):
        Taps(net, ["unused"]).run(net, torch.randn(1, 2))
