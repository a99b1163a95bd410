"""Fused ops. Each op lives in its own module; torch glue only, kernels in lrc_ext._C."""
from .mse_grad import mse_grad  # noqa: F401
