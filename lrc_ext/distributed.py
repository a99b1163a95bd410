"""Data parallelism for the trainer on PyTorch's own engines: torchrun, DDP and FSDP2.

    torchrun --standalone --nproc-per-node 8 -m lrc_ext.train --parallel fsdp ...

``--parallel auto`` (the default) is ``ddp`` when launched by torchrun with WORLD_SIZE > 1 and
``none`` otherwise; ``ddp`` / ``fsdp`` without torchrun run a world of one. The process group
uses NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``) and gloo on the CPU, with ``--dist-timeout``
seconds for any collective, so a rank that dies or hangs ends the job instead of hanging it.

Batches. ``--micro-batch-size`` is the *global* micro-batch: every rank takes its contiguous
``micro_batch_size / world`` rows of it, so the sequences of a step, the data position and
hence checkpoints are the same at any world size, and a run on N ranks computes what one rank
would (the loss terms are means over equally sized slices, and DDP / FSDP average gradients).
Gradients are synchronised on the last micro-batch of a step only (DDP ``no_sync()``, FSDP2
``set_requires_gradient_sync(False)``). The logged loss terms are averaged over ranks.

DDP replicates the whole LowRankClone (frozen teacher included) on every rank; only the
trainable parameters (projections, student norms) have gradients and buckets.
``find_unused_parameters`` is needed only when neither the CE nor the KL term runs (the
student's final norm then gets no gradient); buffers are identical on every rank and not
broadcast.

FSDP2 (``fully_shard``) shards the frozen teacher as well as the student, because at 7B the
teacher's weights dominate memory. The lockstep forward needs the *full* teacher weight
``W_T`` of layer i for the student weights ``W_T @ P`` of layer i, in the forward and again in
the backward (``grad_P = W_T.T @ grad_W_S``). The design: one FSDP group per layer *pair*,
``fully_shard([student_layer_i, teacher_layer_i])``, and LowRankClone runs each lockstep
layer (the teacher's layer, then the student's) through the student layer's module call
(``StudentLayer.forward``). So FSDP2's own hooks do the gathering and freeing:

* forward: the pair's pre-forward hook all-gathers P_i and W_T,i in one collective; the
  teacher layer and the student layer run; the post-forward hook (after the student layer,
  the group's last module) frees both unsharded copies again;
* backward: the pre-backward hook on the student layer's output re-gathers the pair before
  any of layer i's backward runs (the clone-linear ops saved W_T,i: FSDP2 refills the same
  storage, so the saved tensor is valid again); once the gradient reaches the layer's input
  the post-backward hook frees the pair and reduce-scatters grad P_i (the teacher has none).

The student weights ``W_S = W_T @ P`` of a layer live only while its pair is gathered, too: the
clone linears run with ``recompute_ws`` under FSDP2, so the forward keeps no W_S for the
backward, which forms it again from the regathered W_T (one more GEMM a linear; kept, the
W_S of every layer would stay unsharded from its forward to its backward: the whole student,
unsharded, on every rank). At any time one pair is unsharded (plus FSDP2's prefetch of the
next one). The root group
(the teacher's LM head and final norm, which the distillation head needs in the backward
too, the student's P_emb / P_head / final norm) stays unsharded through a step, as FSDP2 does
for roots. An untied teacher embedding is a group of its own, gathered only for the token
lookup (its backward needs the looked-up rows, not the table); a tied one is the LM head and
stays in the root. Parameter memory per rank: (teacher + student) / world + the root group +
one layer pair. ``param_bytes`` reports the sharded and unsharded sizes; tests/
test_distributed.py checks that during layer i's forward and backward no other layer is
gathered. A teacher-only forward (the teacher's held-out CE) uses ``teacher_alone``: each
decoder layer is freed right after its own forward.

Loading the teacher under FSDP2: no rank holds the whole teacher for training. Each rank builds it on the meta device (parameters only: RoPE's buffers are
computed for real), ``wrap`` shards it as above, and ``load_teacher`` then allocates each
rank's local shards and reads just their rows (FSDP2's Shard(0): ceil(rows / world) a rank)
of every tensor from the safetensors files with plain file reads (``teacher.SafetensorsRows``:
a memory map would keep every page the rank touched resident until closed), in the teacher's
storage dtype. Host memory per rank for the teacher: its shard, ~teacher / world, plus at most
one block of rows in flight (16 MiB); the trainer reports each rank's peak RSS growth up to the
wrapping and its peak RSS up to the end of training. A fresh ``--init pca`` or ``--clone-norm
target`` run calibrates on the whole teacher once: rank 0 alone loads it (``load_whole``: a
tensor at a time into the meta-built model, never the file and the converted copy at once),
fits the student's start, frees it, and ``broadcast_state`` sends the start to the other ranks
(which wait meanwhile), before every rank builds its meta-device teacher. A hub id (no local
safetensors) loads whole on every rank, as DDP does. After training rank 0 reloads the teacher
whole (``load_whole``) for the export.

Host memory of a CPU FSDP2 step: every pair's all-gather allocates and frees buffers of a layer's
size, the activations interleave with them, and glibc's malloc keeps the freed heap resident
(its mmap threshold rises to the largest block freed, up to 32 MiB, so these blocks come from
the heap): measured on the default teacher, RSS grew ~16 MiB a layer through the forward with
nothing of those layers alive. So on the CPU the trainer has glibc hand its free pages back
(``trim_host_heap_per_layer``: ``malloc_trim`` after each pair's forward and before its backward;
``--host-trim``, on by default for FSDP on the CPU). The pages come back through page faults when
reused: measured on the default teacher (2 ranks, 2-core machine), training peaks fell from
1.45-1.93 to 1.28-1.31 GiB a rank while a step took ~25% longer. On CUDA the step's memory is the
device's and the host heap is left alone.

Checkpoints stay in the trainer's safetensors format: trainable parameters and AdamW state are
gathered to full tensors (``DTensor.full_tensor``) and written by rank 0, and on load each
rank takes its shard (``distribute_tensor``), so a run saved on N ranks resumes on M ranks,
with or without FSDP. Logging, plots, evaluation printing and export happen on rank 0; the
held-out evaluation is split over the ranks and summed.

Testing hook (test-only): ``LRC_TEST_KILL_RANK_AT_STEP=RANK:STEP`` makes rank RANK SIGKILL itself
as step STEP starts; the job must then fail with a clear message, not hang.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import signal
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

MODES = ("auto", "none", "ddp", "fsdp")


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_mode(mode: str) -> str:
    return ("ddp" if env_world() > 1 else "none") if mode == "auto" else mode


class Parallel:
    """The run's parallel layout: mode, rank, world, device, and the wrapped model."""

    def __init__(self, mode: str = "none"):
        self.mode = mode
        self.rank, self.world, self.local_rank = 0, 1, 0
        self.model = None      # what the loop calls (DDP / FSDP module or the LowRankClone)
        self.inner = None      # the LowRankClone itself

    # ---- process group ----------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device_type: str, timeout_s: float):
        """Join the process group (torchrun's env:// rendezvous, or a world of one)."""
        if not self.active:
            return
        backend = "nccl" if device_type == "cuda" else "gloo"
        kw = dict(backend=backend, timeout=timedelta(seconds=timeout_s))
        if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
            self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if device_type == "cuda":
                torch.cuda.set_device(self.local_rank)
                kw["device_id"] = torch.device("cuda", self.local_rank)
            dist.init_process_group(**kw)
        else:  # --parallel ddp/fsdp without torchrun: a world of one
            if device_type == "cuda":
                kw["device_id"] = torch.device("cuda", torch.cuda.current_device())
            dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1, **kw)

    @property
    def backend(self) -> str:
        return dist.get_backend() if self.active and dist.is_initialized() else "none"

    def barrier(self):
        if self.active:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 first (downloads, dataset caches), then the others."""
        if self.active and not self.is_main:
            dist.barrier()
        yield
        if self.active and self.is_main:
            dist.barrier()

    # ---- wrapping ---------------------------------------------------------------------------
    def wrap(self, model: nn.Module, device: torch.device, find_unused: bool) -> nn.Module:
        """DDP or FSDP2 around the LowRankClone (built on the CPU for FSDP: fully_shard moves only
        the shards to the device); returns the module the loop calls."""
        self.inner = model
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = model.to(device)
            ids = [device.index] if device.type == "cuda" else None
            # buffers (RoPE tables) are the same on every rank: no per-forward broadcast
            import inspect
            no_sync_buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                               inspect.signature(DDP).parameters else {"broadcast_buffers": False})
            self.model = DDP(model, device_ids=ids, find_unused_parameters=find_unused, **no_sync_buffers)
        elif self.mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh(device.type, (self.world,))
            t = model.teacher
            from .modules import FusedCloneLinear
            for m in model.modules():  # W_S lives only while its pair is gathered (module docstring)
                if isinstance(m, FusedCloneLinear):
                    m.recompute_ws = True
            for sl, tl in zip(model.layers, t.model.layers):
                fully_shard([sl, tl], mesh=mesh)  # one group per lockstep pair: see the module docstring
            if t.get_input_embeddings().weight is not t.get_output_embeddings().weight:
                fully_shard(t.model.embed_tokens, mesh=mesh)  # untied: gathered for the lookup only
            fully_shard(model, mesh=mesh)          # root: LM head, final norms, P_emb / P_head
            self.model = model
        else:
            self.model = model.to(device)
        return self.model

    # ---- the step ---------------------------------------------------------------------------
    def accumulate(self, last: bool):
        """Context for one micro-batch's forward + backward: gradients sync on the last only."""
        if self.mode == "ddp" and not last:
            return self.model.no_sync()
        if self.mode == "fsdp":
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def average_grads(self, params):
        """The gradients averaged over ranks in one coalesced all-reduce (DDP with step weights:
        lrc_ext/step_weights.py). Every rank has the same set of gradients."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.world > 1 and grads:
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat /= self.world
            for g, r in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(r)

    def local_rows(self, n: int) -> tuple[int, int]:
        """(offset, count) of this rank's slice of a global micro-batch of n sequences."""
        per = n // self.world
        return self.rank * per, per

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        """Clip in place; the total norm as a 0-dim tensor on the device (no host sync)."""
        if self.mode != "fsdp":
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, 2.0)
        if hasattr(total, "full_tensor"):  # DTensor: sum the shards' squares over ranks
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of `t` over ranks (a CPU tensor in and out)."""
        if self.active and self.world > 1:
            t = t.to(_comm_device())
            dist.all_reduce(t)
            t = t.cpu()
        return t

    def all_gather_float(self, x: float) -> list[float]:
        if not (self.active and self.world > 1):
            return [x]
        out = [torch.zeros(1, dtype=torch.float64, device=_comm_device()) for _ in range(self.world)]
        dist.all_gather(out, torch.tensor([x], dtype=torch.float64, device=_comm_device()))
        return [t.item() for t in out]

    def kill_hook(self, step: int):
        """Test-only fault injection: LRC_TEST_KILL_RANK_AT_STEP=RANK:STEP."""
        spec = os.environ.get("LRC_TEST_KILL_RANK_AT_STEP")
        if spec:
            r, s = (int(x) for x in spec.split(":"))
            if r == self.rank and s == step:
                os.kill(os.getpid(), signal.SIGKILL)

    # ---- state: full tensors out, shards in -------------------------------------------------
    def full(self, t: torch.Tensor) -> torch.Tensor:
        """A full (unsharded) CPU copy of a parameter or optimiser tensor (a collective under FSDP)."""
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        return t.detach().cpu()

    def shard_like(self, full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """This rank's piece of a full tensor shaped like `param` (the tensor itself off FSDP)."""
        if hasattr(param, "device_mesh") and tuple(full.shape) == tuple(param.shape):
            from torch.distributed.tensor import distribute_tensor
            return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        return full

    def broadcast_state(self, model: nn.Module, state: dict | None):
        """Rank 0's trainable state (``state``; None on the others) into every rank's model,
        before wrapping: one broadcast a tensor, in the model's own order."""
        mine = model.trainable_state_dict()
        if self.is_main and set(state) != set(mine):
            raise RuntimeError(f"broadcast_state: rank 0's state has other keys than the model "
                               f"({sorted(set(state) ^ set(mine))[:4]})")
        out = {}
        for name, t in mine.items():
            buf = (state[name] if self.is_main else torch.empty_like(t, device="cpu")).to(_comm_device())
            if self.active and self.world > 1:
                dist.broadcast(buf, src=0)
            out[name] = buf.to(t.device)
        model.load_trainable_state_dict(out)

    def load_teacher(self, teacher: nn.Module, src: str, device: torch.device):
        """Fill a meta-device teacher after ``wrap``: each rank reads its own rows of every
        teacher tensor from the safetensors files (lrc_ext/teacher.py, ``load_shards``)."""
        from .teacher import load_shards
        load_shards(teacher, src, device)

    @contextlib.contextmanager
    def teacher_alone(self):
        """A teacher-only forward (the teacher's held-out CE) under FSDP2: the root group is
        gathered, each decoder layer is freed right after its own forward, and FSDP2's
        per-iteration state is reset at the end (the student half of each pair did not run)."""
        if self.mode != "fsdp":
            yield
            return
        root = self.model
        root.unshard()
        hooks = [tl.register_forward_hook(lambda m, i, o: m.reshard()) for tl in root.teacher.model.layers]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            root.reset_iter_state()


def _malloc_trim():
    """glibc's malloc_trim(0), or None where the C library has none (musl, macOS)."""
    import ctypes
    import ctypes.util
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int

    def trim():
        fn(0)
    return trim


def trim_host_heap_per_layer(layers) -> bool:
    """Hooks on each layer: malloc_trim after its forward and when its output's gradient
    arrives (its backward starts). False where there is no malloc_trim (nothing hooked)."""
    trim = _malloc_trim()
    if trim is None:
        return False

    def after_forward(module, args, out):
        trim()
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda g: trim())  # returns None: the gradient passes unchanged
                break

    for layer in layers:
        layer.register_forward_hook(after_forward)
    return True


def param_bytes(model: nn.Module) -> dict:
    """Bytes of parameters held on this rank (local shards under FSDP) and unsharded, teacher
    and student apart."""
    out = {"teacher_local": 0, "teacher_full": 0, "student_local": 0, "student_full": 0}
    for name, p in model.named_parameters():
        who = "teacher" if name.startswith("teacher.") else "student"
        local = p.to_local() if hasattr(p, "to_local") else p
        out[f"{who}_local"] += local.numel() * local.element_size()
        out[f"{who}_full"] += math.prod(p.shape) * p.element_size()
    return out


def peak_rss() -> int:
    """This process's peak resident set size so far, in bytes (Linux: ru_maxrss is in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _comm_device() -> torch.device:
    """Where small tensors for collectives live: NCCL needs them on the rank's GPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shutdown():
    """Leave the process group with nothing of it left for interpreter exit to tear down: FSDP2's
    modules sit in reference cycles that hold DTensors and the device mesh, and a gloo group
    whose tensors die during interpreter finalisation can abort the process (seen as
    "terminate called without an active exception" from a rank that had finished cleanly)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


_FAILURE_WORDS = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out", "timeout",
                  "socket", "peer", "watchdog", "store")


def is_collective_failure(e: BaseException) -> bool:
    """True for the errors a collective raises when another rank died or stopped answering."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _FAILURE_WORDS)


def describe_failure(e: BaseException) -> str:
    rank, world = dist.get_rank(), dist.get_world_size()
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return (f"rank {rank} of {world}: a collective with the other ranks failed, so another rank died or stopped "
            f"answering (torchrun's report names the rank that failed first); the job stops. Cause: "
            f"{type(e).__name__}: {first[:300]}. Continue from the last checkpoint with --resume.")
