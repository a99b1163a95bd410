"""lrc_ext: Low-Rank Clone distillation (arXiv 2505.12781) with fused C++/CUDA kernels."""
__version__ = "0.1.0"

from . import ops  # noqa: F401


def __getattr__(name):
    # Heavy modules (transformers) load on first use, so `import lrc_ext` stays fast.
    if name in ("LowRankClone", "LRCOutput"):
        from . import model
        return getattr(model, name)
    if name == "FusedCloneLinear":
        from .modules import FusedCloneLinear
        return FusedCloneLinear
    raise AttributeError(f"module 'lrc_ext' has no attribute {name!r}")
