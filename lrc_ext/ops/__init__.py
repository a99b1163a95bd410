"""Fused ops. Each op lives in its own module; torch glue only, kernels in lrc_ext._C."""
from .clone_linear import clone_linear, clone_linear_reference  # noqa: F401
from .distill_head import distill_head, distill_head_reference  # noqa: F401
