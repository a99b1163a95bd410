"""A training step on CUDA makes no host sync outside the one the loop marks: the step's
forward and backward (every micro-batch, the step weights' formation and its backward) run
under torch.cuda.set_sync_debug_mode("error"), which raises on any synchronising call."""
from __future__ import annotations

import pytest
import torch

from _tiny import VOCAB, tiny_teacher
from lrc_ext.model import LowRankClone
from lrc_ext.step_weights import StepWeights


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_has_no_host_sync(dtype):
    torch.manual_seed(0)
    model = LowRankClone(tiny_teacher("llama", tie=True).cuda(), 40).cuda()
    ids = [torch.randint(0, VOCAB, (2, 16), device="cuda") for _ in range(2)]
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    for i in range(2):  # the first step warms up caches (cuBLAS handles, probes); the second is checked
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if i else "default")
        try:
            sw = StepWeights(model)
            for x in ids:
                with amp:
                    out = model(x)
                (out.loss / len(ids)).backward()
            sw.backward()
            gnorm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(gnorm).item()  # host sync: the loop's one, outside the checked region
        model.zero_grad(set_to_none=True)
