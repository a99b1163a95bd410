"""Teacher families LRC supports, the student's config, and the stock-model export.

The family is read from ``config.model_type`` only. Everything family-specific that the
student needs (RoPE, attention function, RMSNorm class) is taken from the teacher's own
transformers modules, so no modeling code is forked here.
"""
from __future__ import annotations

import copy
import inspect
import sys

import torch
from torch import nn

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")

# kind -> (submodule of a decoder layer, side). Input side: W_S = W_T @ P; output: P.T @ W_T.
KINDS = {
    "q": ("self_attn.q_proj", "in"),
    "k": ("self_attn.k_proj", "in"),
    "v": ("self_attn.v_proj", "in"),
    "gate": ("mlp.gate_proj", "in"),
    "up": ("mlp.up_proj", "in"),
    "o": ("self_attn.o_proj", "out"),
    "down": ("mlp.down_proj", "out"),
}
NORMS = ("input_layernorm", "post_attention_layernorm")
# Config keys that describe how the teacher was stored or where it came from, not the model:
# a GGUF-loaded teacher carries quantization_config (its file) and its GGUF name; kept, they
# would make the exported student claim to be quantized (and refuse .float()).
TEACHER_STORAGE = ("quantization_config", "_name_or_path", "_model_name_or_path", "_commit_hash")


def _refuse(why: str):
    raise ValueError(f"LowRankClone: {why}. Supported: dense causal LMs of the families "
                     f"{', '.join(SUPPORTED)} (RMSNorm, RoPE, GQA, SwiGLU, full attention).")


def validate_teacher(teacher: nn.Module):
    """Refuse anything the student cannot mirror exactly, with a message naming what works."""
    cfg = getattr(teacher, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED:
        _refuse(f"teacher model_type {mt!r} is not supported")
    if any(getattr(cfg, a, 0) for a in ("num_experts", "num_local_experts", "n_routed_experts")):
        _refuse("mixture-of-experts teachers are not supported")
    sw, types = getattr(cfg, "sliding_window", None), getattr(cfg, "layer_types", None)
    if mt == "mistral":  # Mistral's window is live whenever set; one covering every position is a no-op
        sliding = sw is not None and sw < cfg.max_position_embeddings
    elif types is not None:
        sliding = "sliding_attention" in types
    else:  # transformers < 4.53 Qwen: layers >= max_window_layers slide when use_sliding_window
        sliding = bool(getattr(cfg, "use_sliding_window", False) and sw
                       and getattr(cfg, "max_window_layers", 0) < cfg.num_hidden_layers)
    if sliding:
        _refuse(f"sliding-window attention is not supported (sliding_window={sw}); use a full-attention config")
    base = getattr(teacher, "model", None)
    if base is None or not hasattr(base, "layers") or teacher.get_output_embeddings() is None:
        _refuse(f"expected a *ForCausalLM model with .model.layers and an LM head, got {type(teacher).__name__}")
    for i, layer in enumerate(base.layers):
        for name, side in KINDS.values():
            lin = layer.get_submodule(name) if _has(layer, name) else None
            if not isinstance(lin, nn.Linear):
                _refuse(f"layer {i} has no nn.Linear {name} (MoE or non-SwiGLU MLP?)")
            if side == "out" and lin.bias is not None:
                _refuse(f"layer {i} {name} has a bias (attention_bias/mlp_bias on the output side)")
        for n in NORMS:
            if not type(getattr(layer, n, None)).__name__.endswith("RMSNorm"):
                _refuse(f"layer {i} {n} is not an RMSNorm")
    if not type(base.norm).__name__.endswith("RMSNorm"):
        _refuse("the final norm is not an RMSNorm")
    if teacher.get_output_embeddings().bias is not None:
        _refuse("the LM head has a bias")


def _has(mod: nn.Module, name: str) -> bool:
    try:
        mod.get_submodule(name)
        return True
    except AttributeError:
        return False


def family_module(teacher: nn.Module):
    """The teacher's transformers modeling module (apply_rotary_pos_emb, eager_attention_forward)."""
    return sys.modules[type(teacher.model.layers[0].self_attn).__module__]


def attention_function(teacher: nn.Module):
    """The attention function the teacher's own layers use (sdpa, eager, flash...)."""
    impl = teacher.config._attn_implementation
    fam = family_module(teacher)
    if impl in (None, "eager"):
        return fam.eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return ALL_ATTENTION_FUNCTIONS[impl]


def causal_mask(teacher: nn.Module, embeds: torch.Tensor, attention_mask, position_ids):
    """The mask the teacher's own model forward would build (format depends on attention impl)."""
    cache_position = torch.arange(embeds.shape[1], device=embeds.device)
    try:
        from transformers.masking_utils import create_causal_mask
    except ImportError:  # transformers < 4.53: the model builds its own mask
        return teacher.model._update_causal_mask(attention_mask, embeds, cache_position, None, False)
    params = inspect.signature(create_causal_mask).parameters
    kw = dict(config=teacher.config, attention_mask=attention_mask, position_ids=position_ids)
    kw["cache" if "cache" in params else "past_key_values"] = None  # renamed in 5.2x
    kw["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = embeds  # renamed in 5.0
    if "cache_position" in params:  # dropped in 5.0
        kw["cache_position"] = cache_position
    return create_causal_mask(**kw)


def head_dim(teacher: nn.Module) -> int:
    return teacher.model.layers[0].self_attn.head_dim


def student_config(teacher: nn.Module, hidden_size: int, tie_word_embeddings: bool):
    """The teacher's config with hidden_size=d_S and an explicit head_dim; raises when the
    installed transformers refuses it (e.g. LlamaConfig wants hidden_size % heads == 0)."""
    d = copy.deepcopy(teacher.config.to_dict())
    d.update(hidden_size=hidden_size, head_dim=head_dim(teacher), tie_word_embeddings=tie_word_embeddings)
    for k in [k for k in d if k in TEACHER_STORAGE or "gguf" in k.lower()]:
        d.pop(k)
    cfg = type(teacher.config).from_dict(d)
    if cfg.hidden_size != hidden_size or getattr(cfg, "head_dim", None) != d["head_dim"]:
        raise ValueError(f"config did not keep hidden_size={hidden_size}, head_dim={d['head_dim']}")
    return cfg


def _width_ok(teacher, w, tie) -> bool:
    try:
        student_config(teacher, w, tie)
        return True
    except Exception:
        return False


def nearest_widths(teacher: nn.Module, width: int, tie: bool, limit: int = 4096):
    """Closest exportable widths below and above `width` (within 1..d_T), for error messages."""
    d_t = teacher.config.hidden_size
    below = next((w for w in range(width - 1, max(0, width - limit), -1) if _width_ok(teacher, w, tie)), None)
    above = next((w for w in range(width + 1, min(d_t, width + limit) + 1) if _width_ok(teacher, w, tie)), None)
    return [w for w in (below, above) if w is not None]


def check_width(teacher: nn.Module, width: int, tie: bool):
    """Build the student config now, and a meta-device stock model from it, so a width that
    cannot be exported fails at construction, naming the nearest widths that work."""
    try:
        cfg = student_config(teacher, width, tie)
    except Exception as e:  # transformers' validation error types vary across versions
        near = nearest_widths(teacher, width, tie)
        raise ValueError(
            f"student_hidden_size={width} cannot be exported as a {teacher.config.model_type} checkpoint "
            f"with the installed transformers ({str(e).strip().splitlines()[-1].strip()}). "
            f"Nearest widths that work: {near}") from None
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        stock = AutoModelForCausalLM.from_config(cfg)
    return cfg, {k: tuple(v.shape) for k, v in stock.state_dict().items()}


def build_stock_model(cfg, state_dict: dict, dtype: torch.dtype, device=None,
                      attn_implementation: str | None = None):
    """A stock transformers model of `cfg` holding `state_dict` (every key must be given)."""
    import transformers
    from transformers import AutoModelForCausalLM
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    old = tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (4, 56)
    kw["torch_dtype" if old else "dtype"] = dtype  # renamed in 4.56
    # Built for real (not on meta): non-persistent buffers such as RoPE's inv_freq must be set up.
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, **kw)
    missing = set(model.state_dict()) - set(state_dict)
    extra = set(state_dict) - set(model.state_dict())
    if missing or extra:
        raise RuntimeError(f"student state dict does not match the stock model: missing {sorted(missing)}, "
                           f"unexpected {sorted(extra)}")
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
