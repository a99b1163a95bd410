"""Run pytest and count which path clone_linear's eligible-or-not calls took.

    LRC_CUTLASS=1 python tools/cutlass_dispatch.py -m cuda tests/test_clone_linear.py

Every call of lrc_ext.ops._cutlass.forward is counted: it returns the CUTLASS kernels' result
(taken) or None (the cuBLAS path). Prints "cutlass dispatch: T of C calls took the CUTLASS
path" last. Exit status: pytest's; 3 when pytest passed but no call took the path although
this machine should take it (kernels built, an sm_90 GPU, LRC_CUTLASS=1), i.e. the run did
not exercise what it was meant to.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tree's lrc_ext, as pytest run from the root imports it


def main(argv=None) -> int:
    import pytest
    import torch

    from lrc_ext.ops import _cutlass

    args = sys.argv[1:] if argv is None else argv
    real, seen = _cutlass.forward, []

    def counted(*a, **k):
        r = real(*a, **k)
        seen.append(r is not None)
        return r
    _cutlass.forward = counted
    try:
        rc = int(pytest.main(["-p", "no:cacheprovider", *args]))
    finally:
        _cutlass.forward = real
    should = (_cutlass.built() and os.environ.get(_cutlass.ENV) == "1" and torch.cuda.is_available()
              and torch.cuda.get_device_capability() == (9, 0))
    print(f"cutlass dispatch: {sum(seen)} of {len(seen)} calls took the CUTLASS path "
          f"(expected some: {should})", flush=True)
    if rc == 0 and should and not any(seen):
        print("cutlass dispatch: FAILED: no call took the CUTLASS path", flush=True)
        return 3
    return rc


if __name__ == "__main__":
    sys.exit(main())
