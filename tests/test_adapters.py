import pytest
import torch
from torch import nn

from distill.adapters import make_adapter
from distill.errors import DistillError

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(
    "s,t",
    [((2, 8), (2, 16)), ((2, 5, 8), (2, 5, 12)), ((2, 8, 8, 8), (2, 16, 4, 4)),
     ((2, 8, 4, 4), (2, 16, 8, 8)), ((2, 4, 10), (2, 8, 10))],
)
def test_adapter_maps_student_shape_to_teacher_shape(s, t):
    adapter = make_adapter(s, t)
    out = adapter(torch.randn(*s))
    assert tuple(out.shape) == t
    assert any(p.requires_grad for p in adapter.parameters())


def test_identity_when_shapes_agree():
    assert isinstance(make_adapter((2, 4), (2, 4)), nn.Identity)


def test_rank_mismatch_is_an_error():
    with pytest.raises(DistillError, match="differ in rank"):
        make_adapter((2, 8), (2, 8, 4, 4))
