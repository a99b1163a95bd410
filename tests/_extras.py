"""Optional extras in tests: `lm_eval` (``.[eval]``), `wandb` (``.[wandb]``), `accelerate`
(pulled in by lm_eval[hf]; transformers' own GGUF loading needs it).

    from _extras import require
    lm_eval = require("lm_eval")

Without the package the test is skipped, except where LRC_REQUIRE_EXTRAS=1 (CI sets it, and
installs the extras): there a missing extra fails the test instead of hiding it.
"""
from __future__ import annotations

import importlib
import os

import pytest


def require(module: str):
    if os.environ.get("LRC_REQUIRE_EXTRAS") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"needs {module} (an optional extra; CI installs it)")
