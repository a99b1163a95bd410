"""Teacher families LRC supports, the student's config, and the stock-model export.

The family is read from ``config.model_type`` only. Everything family-specific that the
student needs (RoPE, attention function, RMSNorm class) is taken from the teacher's own
transformers modules, so no modeling code is forked here. What differs in a decoder layer's
layout (which norm feeds which block, post-block norms, fused linears, the norm's weight
convention, a scaled embedding) is one ``Layout`` per family (``layout(teacher)``).
"""
from __future__ import annotations

import copy
import inspect
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "phi3")

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
NORMS = ("input_layernorm", "post_attention_layernorm")  # the Llama layout's
# Config keys that describe how the teacher was stored or where it came from, not the model:
# a GGUF-loaded teacher carries quantization_config (its file) and its GGUF name; kept, they
# would make the exported student claim to be quantized (and refuse .float()).
TEACHER_STORAGE = ("quantization_config", "_name_or_path", "_model_name_or_path", "_commit_hash")


class RowSlice(nn.Linear):
    """Rows [lo, hi) of a fused teacher nn.Linear (Phi-3's qkv_proj, gate_up_proj), read on
    every access (nothing copied or registered, so sharding the fused weight is seen)."""

    def __init__(self, fused: nn.Linear, lo: int, hi: int):
        nn.Module.__init__(self)
        self.__dict__["fused"] = fused
        self.lo, self.hi = lo, hi
        self.in_features, self.out_features = fused.in_features, hi - lo

    @property
    def weight(self):
        return self.fused.weight[self.lo:self.hi]

    @property
    def bias(self):
        b = self.fused.bias
        return None if b is None else b[self.lo:self.hi]


@dataclass(frozen=True)
class Layout:
    """Where a family's decoder layer keeps what the student mirrors.

    ``linears``: kind -> (module, part): part None for a plain nn.Linear, else the index of the
    kind's rows in a fused one (split sizes from ``split_sizes``). ``attn_norm`` / ``mlp_norm``
    read the residual stream and feed q/k/v / gate/up; ``attn_post`` / ``mlp_post`` (Gemma-3)
    normalise a block's output before the residual add. The norms multiply by
    ``norm_offset + weight`` (Gemma: 1 + w). ``embed_scaled``: the embedding module multiplies
    by its ``embed_scale`` (Gemma: sqrt(hidden_size), so the student's stock value differs)."""
    linears: dict = field(default_factory=lambda: {k: (n, None) for k, (n, _) in KINDS.items()})
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attn_post: str | None = None
    mlp_post: str | None = None
    act: str = "act_fn"
    norm_offset: float = 0.0
    embed_scaled: bool = False
    per_type_rope: bool = False  # rotary_emb(x, pos, layer_type): one RoPE per attention type

    @property
    def norms(self) -> tuple:
        return tuple(n for n in (self.attn_norm, self.mlp_norm, self.attn_post, self.mlp_post) if n)

    def modules(self) -> dict:
        """Teacher module name -> the kinds it holds, in row order."""
        out: dict = {}
        for kind, (name, part) in self.linears.items():
            out.setdefault(name, []).append((part or 0, kind))
        return {n: tuple(k for _, k in sorted(v)) for n, v in out.items()}

    def teacher_linear(self, layer: nn.Module, kind: str) -> nn.Linear:
        name, part = self.linears[kind]
        lin = layer.get_submodule(name)
        if part is None:
            return lin
        sizes = split_sizes(layer, name)
        lo = sum(sizes[:part])
        return RowSlice(lin, lo, lo + sizes[part])

    # norms: the family's class, weight in its own convention; these speak in plain gains
    def gain(self, norm: nn.Module) -> torch.Tensor:
        return norm.weight.detach() + self.norm_offset

    def weight_for_gain(self, gain: torch.Tensor) -> torch.Tensor:
        return gain - self.norm_offset

    @staticmethod
    def eps(norm: nn.Module) -> float:
        return norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps


def split_sizes(layer: nn.Module, name: str) -> tuple:
    """Row sizes of a fused linear's parts: qkv_proj (q, k, v), gate_up_proj (gate, up)."""
    out = layer.get_submodule(name).out_features
    if name.endswith("qkv_proj"):
        q = layer.self_attn.o_proj.in_features  # heads * head_dim
        return q, (out - q) // 2, (out - q) // 2
    return out // 2, out // 2


LLAMA = Layout()
LAYOUTS = {
    "gemma3_text": Layout(mlp_norm="pre_feedforward_layernorm", attn_post="post_attention_layernorm",
                          mlp_post="post_feedforward_layernorm", norm_offset=1.0, embed_scaled=True,
                          per_type_rope=True),
    "phi3": Layout(linears={"q": ("self_attn.qkv_proj", 0), "k": ("self_attn.qkv_proj", 1),
                            "v": ("self_attn.qkv_proj", 2), "gate": ("mlp.gate_up_proj", 0),
                            "up": ("mlp.gate_up_proj", 1), "o": ("self_attn.o_proj", None),
                            "down": ("mlp.down_proj", None)}, act="activation_fn"),
}


def layout(teacher: nn.Module) -> Layout:
    return LAYOUTS.get(teacher.config.model_type, LLAMA)


def _sliding_ok(cfg) -> bool:
    """Families whose sliding-window layers the student mirrors (per-layer mask and RoPE)."""
    return cfg.model_type in ("gemma3_text", "phi3")


def layer_type(teacher: nn.Module, i: int) -> str:
    """'sliding_attention' or 'full_attention': the mask (and, for Gemma-3, the RoPE) layer i uses."""
    cfg = teacher.config
    if cfg.model_type == "gemma3_text":
        return cfg.layer_types[i]
    if cfg.model_type == "phi3" and getattr(cfg, "sliding_window", None) is not None:
        return "sliding_attention"  # Phi3Model: every layer slides when the window is set
    return "full_attention"


def sliding_window(teacher: nn.Module, i: int):
    """The window the teacher's layer i hands its attention function (flash uses it)."""
    if layer_type(teacher, i) != "sliding_attention":
        return None
    attn = teacher.model.layers[i].self_attn
    return getattr(attn, "sliding_window", None) or teacher.config.sliding_window


def rope(teacher: nn.Module, embeds: torch.Tensor, position_ids, types) -> dict:
    """(cos, sin) by layer type, as the teacher's model forward computes them."""
    base = teacher.model
    if layout(teacher).per_type_rope:
        return {t: base.rotary_emb(embeds, position_ids, t) for t in types}
    cs = base.rotary_emb(embeds, position_ids)
    return {t: cs for t in types}


def _refuse(why: str):
    raise ValueError(f"LowRankClone: {why}. Supported: dense causal LMs of the families "
                     f"{', '.join(SUPPORTED)} (RMSNorm, RoPE, GQA, gated MLP; sliding windows "
                     f"only as Gemma-3 and Phi-3 use them; Gemma-3 text-only).")


def validate_teacher(teacher: nn.Module):
    """Refuse anything the student cannot mirror exactly, with a message naming what works."""
    cfg = getattr(teacher, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt == "gemma3":
        _refuse("teacher model_type 'gemma3' (Gemma-3 with its vision tower) is not supported; load the "
                "text model alone (Gemma3ForCausalLM, model_type 'gemma3_text')")
    if mt not in SUPPORTED:
        _refuse(f"teacher model_type {mt!r} is not supported")
    if any(getattr(cfg, a, 0) for a in ("num_experts", "num_local_experts", "n_routed_experts")):
        _refuse("mixture-of-experts teachers are not supported")
    sw, types = getattr(cfg, "sliding_window", None), getattr(cfg, "layer_types", None)
    if mt == "gemma3_text":
        if getattr(cfg, "final_logit_softcapping", None) is not None:
            _refuse(f"final_logit_softcapping={cfg.final_logit_softcapping} is not supported (the "
                    f"distillation head takes plain logits)")
        if getattr(cfg, "use_bidirectional_attention", False):
            _refuse("use_bidirectional_attention=True (an encoder, not a causal LM)")
    if _sliding_ok(cfg):
        sliding = False
    elif mt == "mistral":  # Mistral's window is live whenever set; one covering every position is a no-op
        sliding = sw is not None and sw < cfg.max_position_embeddings
    elif types is not None:
        sliding = "sliding_attention" in types
    else:  # transformers < 4.53 Qwen: layers >= max_window_layers slide when use_sliding_window
        sliding = bool(getattr(cfg, "use_sliding_window", False) and sw
                       and getattr(cfg, "max_window_layers", 0) < cfg.num_hidden_layers)
    if sliding:
        _refuse(f"sliding-window attention is not supported for {mt} (sliding_window={sw}); use a "
                f"full-attention config")
    base = getattr(teacher, "model", None)
    if base is None or not hasattr(base, "layers") or teacher.get_output_embeddings() is None:
        _refuse(f"expected a *ForCausalLM model with .model.layers and an LM head, got {type(teacher).__name__}")
    lay = layout(teacher)
    for i, layer in enumerate(base.layers):
        for kind, (name, _) in lay.linears.items():
            lin = layer.get_submodule(name) if _has(layer, name) else None
            if not isinstance(lin, nn.Linear):
                _refuse(f"layer {i} has no nn.Linear {name} (MoE or non-SwiGLU MLP?)")
            if KINDS[kind][1] == "out" and lin.bias is not None:
                _refuse(f"layer {i} {name} has a bias (attention_bias/mlp_bias on the output side)")
        for n in lay.norms:
            if not type(getattr(layer, n, None)).__name__.endswith("RMSNorm"):
                _refuse(f"layer {i} {n} is not an RMSNorm")
    if not type(base.norm).__name__.endswith("RMSNorm"):
        _refuse("the final norm is not an RMSNorm")
    if teacher.get_output_embeddings().bias is not None:
        _refuse("the LM head has a bias")
    if lay.embed_scaled != hasattr(base.embed_tokens, "embed_scale"):
        _refuse(f"the embedding of {type(teacher).__name__} is not the {mt} layout's")


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


def causal_masks(teacher: nn.Module, embeds: torch.Tensor, attention_mask, position_ids, types) -> dict:
    """The masks by layer type the teacher's own model forward would build."""
    out = {}
    for t in types:
        if t == "sliding_attention":
            from transformers.masking_utils import create_sliding_window_causal_mask
            out[t] = causal_mask(teacher, embeds, attention_mask, position_ids, create_sliding_window_causal_mask)
        else:
            out[t] = causal_mask(teacher, embeds, attention_mask, position_ids)
    return out


def causal_mask(teacher: nn.Module, embeds: torch.Tensor, attention_mask, position_ids, make=None):
    """The mask the teacher's own model forward would build (format depends on attention impl)."""
    cache_position = torch.arange(embeds.shape[1], device=embeds.device)
    try:
        from transformers.masking_utils import create_causal_mask
    except ImportError:  # transformers < 4.53: the model builds its own mask
        return teacher.model._update_causal_mask(attention_mask, embeds, cache_position, None, False)
    make = make or create_causal_mask
    params = inspect.signature(make).parameters
    kw = dict(config=teacher.config, attention_mask=attention_mask, position_ids=position_ids)
    kw["cache" if "cache" in params else "past_key_values"] = None  # renamed in 5.2x
    kw["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = embeds  # renamed in 5.0
    if "cache_position" in params:  # dropped in 5.0
        kw["cache_position"] = cache_position
    return make(**kw)


def export_folds(teacher: nn.Module, d_s: int, tied: bool) -> tuple:
    """(embedding factor, final-norm gain factor) that fold into the exported weights what the
    stock student config cannot express. Gemma-3 scales its embedding by sqrt(hidden_size):
    the stock student multiplies by sqrt(d_S) where the clone carries the teacher's sqrt(d_T),
    so the exported embedding is multiplied by sqrt(d_T) / sqrt(d_S). A tied export shares that
    matrix with the LM head, so the final norm's gain takes the inverse (logits unchanged)."""
    if not layout(teacher).embed_scaled:
        return 1.0, 1.0
    emb = teacher.model.embed_tokens
    k = embed_scale(teacher) / _as_used(d_s ** 0.5, emb.weight.dtype)
    return k, (1.0 / k if tied else 1.0)


def _as_used(x: float, dtype: torch.dtype) -> float:
    """A scale as the stock module applies it: cast to the weight's dtype."""
    return float(torch.tensor(x, device="cpu").to(dtype))


def embed_scale(teacher: nn.Module) -> float:
    """The factor the teacher's embedding module multiplies its lookup by (Gemma-3:
    sqrt(hidden_size), in the weight's dtype); 1.0 for the families without one."""
    if not layout(teacher).embed_scaled:
        return 1.0
    emb = teacher.model.embed_tokens
    s_t = getattr(emb, "scalar_embed_scale", None) or float(emb.embed_scale)  # a float also on meta
    return _as_used(s_t, emb.weight.dtype)


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
