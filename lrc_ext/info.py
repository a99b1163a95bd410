"""`python -m lrc_ext.info`: what this lrc_ext was built with and what it can see."""
from __future__ import annotations

import platform
import sys


def collect() -> dict:
    import torch

    import lrc_ext
    from . import _ext

    info = {
        "lrc_ext": lrc_ext.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension": _ext.available(),
        "extension_error": None if _ext.available() else str(_ext._IMPORT_ERROR),
        "cuda_kernels": False,
        "cuda_archs": [],
        "cuda_compiler": None,
        "cxx_compiler": None,
        "cutlass_kernels": False,
        "cutlass_path": None,
        "openmp": False,
        "gpu_visible": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }
    if _ext.available():
        c = _ext._C
        b = c.build_info()
        info.update(cuda_kernels=bool(c.with_cuda), openmp=bool(c.with_openmp), cxx_compiler=b["cxx_compiler"],
                    cuda_archs=[a for a in b["cuda_archs"].split(",") if a],
                    cuda_compiler=("nvcc " + b["cuda_version"]) if c.with_cuda else None)
        from .ops import _cutlass
        info.update(cutlass_kernels=_cutlass.built(), cutlass_path=_cutlass.status())
    return info


def main(argv=None) -> int:
    import json
    args = sys.argv[1:] if argv is None else argv
    info = collect()
    if "--json" in args:
        print(json.dumps(info, indent=2))
        return 0
    w = max(len(k) for k in info)
    for k, v in info.items():
        if k == "extension_error" and v is None:
            continue
        if isinstance(v, list):
            v = ", ".join(v) if v else "-"
        print(f"{k:<{w}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
