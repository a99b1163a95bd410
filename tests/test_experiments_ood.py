"""experiments/ood.py: the out-of-domain texts are written as the trainer reads JSONL, and the
windowed CE is the plain next-token cross-entropy."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from _tiny import VOCAB, tiny_teacher

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import ood  # noqa: E402


def test_ood_files_are_paragraph_jsonl(tmp_path):
    licence = tmp_path / "LICENCE"
    licence.write_text("short\n\n" + "a paragraph of licence text long enough to keep " * 2 + "\n\nend")
    files = ood.ood_files(tmp_path / "w", licence)
    assert [f.stem for f in files] == ["ood-prose", "ood-news", "ood-cook", "ood-gpl3"]
    for f in files:
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        assert rows and all(len(r["text"].split()) >= 8 and "\n" not in r["text"] for r in rows)
    assert len(files[-1].read_text().splitlines()) == 1  # paragraphs under 8 words are dropped
    assert len(ood.ood_files(tmp_path / "v", tmp_path / "absent")) == 3  # no licence file: skipped


def test_windowed_ce_is_next_token_cross_entropy():
    model = tiny_teacher("llama", layers=1)
    ids = torch.randint(0, VOCAB, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    x = torch.tensor(ids)[None]
    with torch.no_grad():
        whole = F.cross_entropy(model(x[:, :-1]).logits[0], x[0, 1:]).item()
        # windows of 32: each scored on its own (no context across windows), weighted by its tokens
        windows = [x[:, i:i + 33] for i in range(0, 69, 32)]  # 33, 33 and 6 tokens: 32, 32 and 5 targets
        parts = [(F.cross_entropy(model(w[:, :-1]).logits[0], w[0, 1:], reduction="sum").item(), w.shape[1] - 1)
                 for w in windows]
    assert abs(ood._ce_on(model, ids, 70) - whole) < 1e-5
    assert abs(ood._ce_on(model, ids, 32) - sum(s for s, _ in parts) / sum(n for _, n in parts)) < 1e-5
