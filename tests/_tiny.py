"""Tiny random teachers of every supported family, built from configs (no downloads).

    from _tiny import tiny_teacher, FAMILIES   # tests/ is on sys.path under pytest
    teacher = tiny_teacher("qwen2", tie=False, layers=2)
"""
from __future__ import annotations

import pytest
import torch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "phi3")
D_T, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 64, 4, 2, 16, 96, 128


def tiny_config(family: str, *, tie: bool = False, layers: int = 2, attn: str = "sdpa", **over):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config
    kw = dict(hidden_size=D_T, intermediate_size=FFN, num_hidden_layers=layers, num_attention_heads=HEADS,
              num_key_value_heads=KV_HEADS, vocab_size=VOCAB, max_position_embeddings=256,
              tie_word_embeddings=tie, rms_norm_eps=1e-6)
    if family == "llama":
        cfg = LlamaConfig(**{**kw, **over})
    elif family == "qwen2":  # q/k/v biases
        cfg = Qwen2Config(**{**kw, **over})
    elif family == "qwen3":  # per-head q/k norms, explicit head_dim
        cfg = Qwen3Config(**{**kw, "head_dim": HEAD_DIM, **over})
    elif family == "mistral":
        cfg = MistralConfig(**{**kw, "sliding_window": None, **over})
    elif family == "gemma3_text":  # (1 + w) norms, sqrt(d) embedding, 4 norms a layer, q/k norms,
        # a live sliding window on layer 0 with its own RoPE base, query_pre_attn_scalar != head_dim
        cfg = Gemma3TextConfig(**{**kw, "head_dim": HEAD_DIM, "query_pre_attn_scalar": 24, "sliding_window": 4,
                                  "layer_types": ["sliding_attention", "full_attention"] * (layers // 2)
                                  + ["sliding_attention"] * (layers % 2),
                                  "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                      "full_attention": {"rope_type": "default", "rope_theta": 1e6}},
                                  **over})
    elif family == "phi3":  # fused qkv_proj / gate_up_proj; Phi-4-mini's partial rotary (0.75)
        cfg = Phi3Config(**{**kw, "pad_token_id": None, "eos_token_id": VOCAB - 1,
                            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                "partial_rotary_factor": 0.75}, **over})
    else:
        raise ValueError(family)
    cfg._attn_implementation = attn
    return cfg


def randomize_(model: torch.nn.Module, std: float = 0.1):
    """Non-trivial values everywhere, including norms and biases (stock init leaves them 1 / 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, std if p.dim() > 1 else 0.5)
    return model


def tiny_teacher(family: str, *, tie: bool = False, layers: int = 2, dtype=torch.float32, attn: str = "sdpa",
                 std: float = 0.1, **over):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(tiny_config(family, tie=tie, layers=layers, attn=attn, **over))
    return randomize_(model, std).to(dtype).eval()


def tiny_tokenizer():
    """A word-level fast tokenizer over the tiny vocabulary (for export round trips)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(VOCAB - 1)}
    vocab["<unk>"] = VOCAB - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture(autouse=True, scope="module")
def one_thread_per_module():
    """Tiny matrices: extra threads only add contention (10x slower on a loaded 2-core box).
    Autouse in every test module that imports it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
