"""FusedCloneLinear: shapes, init, no copy of the teacher weight, math against plain formulas."""
import pytest
import torch
from torch import nn

from lrc_ext import FusedCloneLinear
from lrc_ext.modules import resolve_op
import importlib

cl_mod = importlib.import_module("lrc_ext.ops.clone_linear")  # the module (the package re-exports the function)


def teacher_linear(d_in, d_out, bias, dtype=torch.float64):
    lin = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.normal_(0, 0.2)
        if bias:
            lin.bias.normal_(0, 0.5)
    return lin


def test_shapes_init_and_no_copy():
    t_in, t_out = teacher_linear(256, 96, True, torch.float32), teacher_linear(96, 256, False, torch.float32)
    a, b = FusedCloneLinear(t_in, 128, "in"), FusedCloneLinear(t_out, 128, "out")
    assert a.proj.shape == b.proj.shape == (256, 128)
    assert (a.in_features, a.out_features, b.in_features, b.out_features) == (128, 96, 96, 128)
    assert abs(a.proj.std().item() - 0.02) < 0.002 and abs(a.proj.mean().item()) < 0.002
    for m, t in ((a, t_in), (b, t_out)):
        assert [n for n, _ in m.named_parameters()] == ["proj"] and list(m.state_dict()) == ["proj"]
        assert m.teacher.weight is t.weight  # held by reference, never copied
    assert a.student_weight().shape == (96, 128) and b.student_weight().shape == (128, 96)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("side,bias", [("in", True), ("in", False), ("out", False)])
def test_matches_plain_formula(fused, side, bias):
    d_t, d_s, other = 48, 24, 40
    t = teacher_linear(d_t, other, bias) if side == "in" else teacher_linear(other, d_t, bias)
    t.requires_grad_(True)  # left trainable on purpose: the module must still not touch it
    m = FusedCloneLinear(t, d_s, side, fused=fused).double()
    x = torch.randn(3, 5, m.in_features, dtype=torch.float64)
    target = torch.randn(3, 5, t.out_features, dtype=torch.float64)
    p = m.proj.detach().clone().requires_grad_(True)
    w_s = t.weight.detach() @ p if side == "in" else p.t() @ t.weight.detach()
    want_y = x @ w_s.t() + (t.bias.detach() if bias else 0)
    want_mse = ((want_y - (target if side == "in" else target @ p)) ** 2).mean()

    y = m(x)
    assert y.shape == (3, 5, m.out_features)
    torch.testing.assert_close(y, want_y, rtol=1e-9, atol=1e-12)
    y2, mse = m(x, target)
    torch.testing.assert_close(y2, want_y, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mse.double(), want_mse, rtol=1e-6, atol=1e-12)
    (y2.square().mean() + mse).backward()
    (want_y.square().mean() + want_mse).backward()
    # the reference forms the MSE in fp32 even for fp64 inputs: grads agree to fp32 precision
    torch.testing.assert_close(m.proj.grad, p.grad, rtol=1e-4, atol=1e-8)
    assert t.weight.grad is None and (t.bias is None or t.bias.grad is None)


def test_bad_arguments():
    with pytest.raises(ValueError, match="side"):
        FusedCloneLinear(teacher_linear(8, 8, False), 4, "mid")
    with pytest.raises(ValueError, match="bias"):
        FusedCloneLinear(teacher_linear(8, 8, True), 4, "out")
    for bad in (0, 9):
        with pytest.raises(ValueError, match="student_features"):
            FusedCloneLinear(teacher_linear(8, 8, False), bad)
    with pytest.raises(TypeError, match="nn.Linear"):
        FusedCloneLinear(nn.Conv1d(8, 8, 1), 4)


def test_resolve_op_switch():
    assert resolve_op("clone_linear", False) is cl_mod.clone_linear_reference
    fused = getattr(cl_mod, "clone_linear", None) or cl_mod.clone_linear_reference
    assert resolve_op("clone_linear", True) is fused and resolve_op("clone_linear", None) is fused
