"""mse_grad against the plain torch expression in fp64, on CPU and (marked) CUDA."""
import pytest
import torch

from lrc_ext.ops import mse_grad
from conftest import DEVICES

# Tolerances: inputs are rounded to the tested dtype first and the fp64 reference uses
# those rounded values, so the only error is the kernel's fp32 accumulation (relative
# ~1e-6 for these sizes) and, for the gradient, one rounding of scale*(a-b) to the
# output dtype: half an ulp, 2^-8 relative for bf16, 2^-11 for fp16 (fp16 subnormals:
# half their spacing, 2^-25, absolute).
GRAD_ATOL = {torch.float16: 2 ** -25}
SUM_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
GRAD_RTOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2 ** -11, torch.bfloat16: 2 ** -8}
SHAPES = [(1, 1), (1, 4097), (7, 13), (33, 1200), (64, 257), (300, 4096), (5, 8200)]


def dtypes_for(device):
    return [torch.float32, torch.bfloat16, torch.float16] + ([torch.float64] if device == "cpu" else [])


def make(shape, dtype, device, row_pad=0):
    rows, cols = shape
    base_a = torch.randn(rows, cols + row_pad, dtype=torch.float64).to(dtype).to(device)
    base_b = torch.randn(rows, cols + row_pad, dtype=torch.float64).to(dtype).to(device)
    return base_a[:, :cols], base_b[:, :cols]


def reference(a, b, scale):
    d = a.double() - b.double()
    return (d * d).sum(), scale * d


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("row_pad", [0, 3])
def test_matches_fp64_reference(device, shape, row_pad):
    for dtype in dtypes_for(device):
        a, b = make(shape, dtype, device, row_pad)
        assert row_pad == 0 or shape[0] == 1 or not a.is_contiguous()
        s_ref, g_ref = reference(a, b, 0.37)
        s, g = mse_grad(a, b, 0.37)
        assert s.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert g.dtype == dtype and g.shape == a.shape
        torch.testing.assert_close(s.double().cpu(), s_ref.cpu(), rtol=SUM_RTOL[dtype], atol=0)
        torch.testing.assert_close(g.double().cpu(), g_ref.cpu(), rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL.get(dtype, 1e-30))
        s_only = mse_grad(a, b)
        assert torch.equal(s_only, s), "sum must not depend on whether the gradient is written"


@pytest.mark.parametrize("device", DEVICES)
def test_out_buffer_fp32_and_strided(device):
    a, b = make((37, 515), torch.bfloat16, device)
    out = torch.full((37, 600), float("nan"), dtype=torch.float32, device=device)[:, :515]
    s, g = mse_grad(a, b, -2.0, out=out)
    assert g is out
    s_ref, g_ref = reference(a, b, -2.0)
    torch.testing.assert_close(out.double().cpu(), g_ref.cpu(), rtol=1e-6, atol=0)
    torch.testing.assert_close(s.double().cpu(), s_ref.cpu(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    a, b = make((4099, 1031), torch.float32, device)
    first = mse_grad(a, b)
    for _ in range(3):
        assert torch.equal(mse_grad(a, b), first)


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    a = torch.empty(0, 5, device=device)
    assert mse_grad(a, a).item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_autograd_of_sum(device):
    a, b = make((9, 31), torch.float64 if device == "cpu" else torch.float32, device)
    a.requires_grad_(True)
    b.requires_grad_(True)
    s, g = mse_grad(a, b, 0.5)
    (3.0 * s + (g * 1.5).sum()).backward()
    d = (a - b).detach()
    torch.testing.assert_close(a.grad, 6.0 * d + 0.75)
    torch.testing.assert_close(b.grad, -(6.0 * d + 0.75))


def test_gradcheck_fp64():
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: mse_grad(x, y, 0.25), (a, b))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    a, b = make((6, 10), torch.float32, device, row_pad=2)
    torch.library.opcheck(torch.ops.lrc_ext.mse_grad.default, (a, b, 0.5, True))
    torch.library.opcheck(torch.ops.lrc_ext.mse_grad.default, (a.requires_grad_(), b, 0.5, False))
    out = torch.empty(6, 10, device=device)
    torch.library.opcheck(torch.ops.lrc_ext.mse_grad_out.default, (a.detach(), b, 0.5, out))


def test_compile_no_graph_break():
    a, b = make((8, 16), torch.float32, "cpu")
    f = torch.compile(lambda x, y: mse_grad(x, y, 2.0)[0] * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(f(a, b), 2 * mse_grad(a, b))


@pytest.mark.parametrize("bad, match", [
    (lambda a, b: mse_grad(a, b[:, :-1]), "same shape"),
    (lambda a, b: mse_grad(a.unsqueeze(0), b.unsqueeze(0)), "argument 'a' must be 2-D"),
    (lambda a, b: mse_grad(a, b.double()), "argument 'b' has dtype float64"),
    (lambda a, b: mse_grad(a.int(), b.int()), "argument 'a' has dtype int32"),
    (lambda a, b: mse_grad(a.t(), b.t()), "unit stride"),
    (lambda a, b: mse_grad(a, b, 1.0, out=torch.empty(3, 3)), "'grad' must have shape"),
    (lambda a, b: mse_grad(a, b, out=torch.empty_like(a)), "without 'scale'"),
    (lambda a, b: mse_grad(a, [1.0]), "must be a torch.Tensor"),
])
def test_bad_input(bad, match):
    a, b = make((4, 5), torch.float32, "cpu")
    with pytest.raises((ValueError, TypeError), match=match):
        bad(a, b)


@pytest.mark.cuda
def test_mixed_devices_error():
    a, b = make((4, 5), torch.float32, "cpu")
    with pytest.raises(ValueError, match="expected cpu"):
        mse_grad(a, b.cuda())
