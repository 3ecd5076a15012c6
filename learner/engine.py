"""DeepSpeed set-up for one learner rank, pure of Ray: process group, config, LR schedule, ZeRO-3 gathers.

Every rank of the learner group runs the same code. The process group comes from the environment
(RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT), which the Ray shell (``learner.group``) or
torchrun sets, so this module works the same under Ray, torchrun and in a plain test process (world size 1).

Choices, with their reasons:

* The optimizer is ``torch.optim.AdamW`` (or SGD), not DeepSpeed's (CPU)Adam: those JIT-compile a C++ op for
  60-100 s on first use, and ZeRO shards a torch optimizer's state just as well.
* Gradient accumulation is *unmanaged* (``managed_gradient_accumulation: false``): every ``engine.step()``
  is an optimizer step, whatever the number of micro-batches before it. The number of kept chains changes
  from step to step (zero-variance groups are dropped), so a fixed ``gradient_accumulation_steps`` cannot
  describe it. ``backward`` is called with ``scale_wrt_gas=False``: the caller normalises each micro-batch
  loss by the global token count itself (``core.grpo.token_mean``).
* DeepSpeed *averages* gradients over data-parallel ranks; a loss normalised by the global token count needs
  the *sum*, so the caller multiplies its loss by the world size (``dp_loss_scale``).
"""

from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from core.config import LearnerConfig, OptimConfig
from core.env import configure_process, torch_extensions_lock
from core.rendezvous import tcp_store
from learner.checkpoint_engine import weights_only_checkpoint_engine

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ------------------------------------------------------------------------------------------ process group
def build_deepspeed_ops() -> list[str]:
    """JIT-build the DeepSpeed ops this machine's ranks load (on the CPU: its shared-memory comm op), once, under
    the extensions lock: scripts/setup_env.sh calls it, so no learner rank compiles (~1-2 min) inside a run.
    Returns the ops' names (none on a GPU build, whose accelerator has no such op)."""
    configure_process()  # TORCH_EXTENSIONS_DIR: the project's cache, where the ranks look
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return []
    with torch_extensions_lock():
        builder.load(verbose=False)
    return [builder.NAME]


def init_distributed(backend: str, timeout_s: float = 1800.0) -> torch.device:
    """Join the learner's process group from the environment and return this rank's device.

    Idempotent: a second worker in the same process (tests) reuses the group. gloo means CPU, nccl means
    ``cuda:LOCAL_RANK`` (under Ray each actor sees only its own GPU, so LOCAL_RANK is 0).
    """
    missing = [k for k in _ENV_KEYS if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"learner process group: environment variables {missing} are not set "
            "(learner.group sets them; under torchrun they are set for you)"
        )
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"learner.backend = {backend!r}: must be gloo (CPU) or nccl (GPU)")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    import deepspeed

    if not torch.distributed.is_initialized():
        # the op DeepSpeed loads in init_distributed, built first under the extensions lock; never the rendezvous
        # under it (a rank holding the lock would wait there for a rank waiting on the lock)
        build_deepspeed_ops()
        rank_id, size, timeout = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), timedelta(seconds=timeout_s)
        # the store listens on MASTER_ADDR only (torch's own env:// store listens on every interface)
        store = tcp_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, rank_id == 0, timeout)
        torch.distributed.init_process_group(backend, store=store, rank=rank_id, world_size=size, timeout=timeout)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    _drop_stale_deepspeed_groups()
    return device


def _drop_stale_deepspeed_groups() -> None:
    """Forget DeepSpeed's cached sub-groups when they belong to an earlier default process group.

    Only matters when one process hosts several workers over time (tests): an in-process vLLM engine destroys
    and re-creates torch.distributed's default group, and DeepSpeed would keep using groups of the old one.
    """
    from deepspeed.utils import groups
    from torch.distributed import distributed_c10d as c10d

    live = c10d._world.pg_group_ranks
    for name, value in list(vars(groups).items()):
        if isinstance(value, torch.distributed.ProcessGroup) and value not in live:
            setattr(groups, name, None)
        elif isinstance(value, dict) and any(
            isinstance(v, torch.distributed.ProcessGroup) and v not in live for v in value.values()
        ):
            value.clear()


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def all_reduce(values: Sequence[float], op: str = "sum", device: torch.device | str = "cpu") -> list[float]:
    """``values`` summed (or max / min) over the learner's ranks, as floats; every rank must call it. gloo
    reduces CPU tensors, nccl needs them on this rank's GPU (``device``)."""
    if world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
           "min": torch.distributed.ReduceOp.MIN}
    torch.distributed.all_reduce(t, op=ops[op])
    return t.cpu().tolist()


def dp_loss_scale() -> float:
    """Factor on a loss normalised by a *global* count, undoing DeepSpeed's mean over data-parallel ranks."""
    return float(world_size())


# ------------------------------------------------------------------------------------------ schedule
def lr_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int) -> Any:
    """transformers' schedule for ``optim.schedule``: linear warmup over ``warmup_steps`` (from 0), then
    ``constant`` | ``cosine`` (to ``min_lr_ratio`` x lr) | ``linear`` (to ``min_lr_ratio`` x lr) over the rest of
    ``total_steps`` optimizer steps."""
    from transformers import get_scheduler

    name, kwargs = {
        "constant": ("constant_with_warmup", {}),
        "cosine": ("cosine_with_min_lr", {"min_lr_rate": optim.min_lr_ratio}),
        "linear": ("polynomial", {"lr_end": optim.lr * optim.min_lr_ratio, "power": 1.0}),
    }[optim.schedule]
    if optim.schedule == "linear" and optim.min_lr_ratio >= 1:
        name, kwargs = "constant_with_warmup", {}  # nothing to decay to (transformers' polynomial refuses it)
    return get_scheduler(name, optimizer, num_warmup_steps=optim.warmup_steps, num_training_steps=total_steps,
                         scheduler_specific_kwargs=kwargs)


# ------------------------------------------------------------------------------------------ engines
def ds_config(learner: LearnerConfig) -> dict[str, Any]:
    """The DeepSpeed config of one trainable model (both models share it; they differ in optimizer only)."""
    zero: dict[str, Any] = {"stage": learner.zero_stage}
    if learner.zero_stage >= 2:
        # Gradients are reduced per backward with unmanaged accumulation; overlap_comm is only
        # supported with it at stage 2/3, and on CPU there is nothing to overlap with.
        zero["overlap_comm"] = learner.backend == "nccl"
    return {
        "train_micro_batch_size_per_gpu": learner.micro_batch_size,  # bookkeeping only (we feed the batches)
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,  # every step() is a boundary (see module docstring)
        "gradient_clipping": learner.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": learner.dtype == "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # the driver logs; DeepSpeed's own prints only add noise
        "wall_clock_breakdown": False,
    }


def _param_groups(module: nn.Module, optim: OptimConfig, key: str) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and norm weights (1-D tensors), as usual for transformers; a
    parameter an ``optim.lr_scale`` pattern matches (the first, ``re.search``) learns at that factor x lr. A
    pattern that matches no trained parameter is an error naming it."""
    scales = list(optim.lr_scale.items())
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    used: set[str] = set()
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        pattern, factor = next(((p, s) for p, s in scales if re.search(p, name)), (None, 1.0))
        used.add(pattern)
        groups.setdefault((factor, param.dim() >= 2), []).append(param)
    unmatched = [p for p, _ in scales if p not in used]
    if unmatched:
        raise ValueError(f"{key}.lr_scale: {unmatched} match no trained parameter of {type(module).__name__}")
    return [{"params": params, "weight_decay": optim.weight_decay if decay else 0.0, "lr": optim.lr * factor}
            for (factor, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0] != 1.0, not kv[0][1]))]


class _ClipAndRecord:
    """Optimizer pre-step hook for ZeRO stage 0 in fp32: DeepSpeed clips there but keeps no grad norm, so
    we clip ourselves (DeepSpeed's own clipping is switched off) and record the pre-clip norm.

    A non-finite norm skips the update as DeepSpeed's ZeRO 1-3 and bf16 optimizers do: the gradients are dropped
    (the optimizer then leaves every parameter and moment as it was) and ``optimizer.overflow`` tells the engine,
    which counts the step as skipped and does not advance the LR schedule (``update_applied``)."""

    def __init__(self, max_norm: float):
        self.max_norm = max_norm
        self.norm: Optional[float] = None

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.max_norm if self.max_norm > 0 else float("inf")
        self.norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        optimizer.overflow = not math.isfinite(self.norm)
        if optimizer.overflow:
            for p in params:
                p.grad = None


def make_optimizer(module: nn.Module, optim: OptimConfig, key: str = "optim") -> torch.optim.Optimizer:
    """torch AdamW (the default) or SGD over ``module``'s trainable parameters, by ``optim.name``."""
    groups = _param_groups(module, optim, key)
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas))
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum)
    raise ValueError(f"optimizer name = {optim.name!r}: must be adamw or sgd")


def build_engine(module: nn.Module, optim: OptimConfig, learner: LearnerConfig, total_steps: int,
                 key: str = "optim") -> Any:
    """Wrap ``module`` in a DeepSpeed engine with the configured torch optimizer and LR schedule.

    ``total_steps`` is the number of optimizer steps of the run (trainer steps x update epochs); the
    schedule needs it for cosine/linear decay. Under ZeRO-3 the parameters are partitioned here.
    """
    import deepspeed

    config = ds_config(learner)
    hook = None
    if learner.zero_stage == 0 and learner.dtype == "float32":
        hook = _ClipAndRecord(learner.grad_clip)
        config["gradient_clipping"] = 0.0
    optimizer = make_optimizer(module, optim, key)
    if hook is not None:
        optimizer.register_step_pre_hook(hook)
    scheduler = lr_scheduler(optimizer, optim, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    engine._realsr_clip_hook = hook  # read by grad_norm()
    engine.checkpoint_engine = weights_only_checkpoint_engine(engine._config)
    return engine


def grad_norm(engine: Any) -> float:
    """Pre-clip global gradient norm of the last ``engine.step()`` (NaN if DeepSpeed did not compute one)."""
    hook = getattr(engine, "_realsr_clip_hook", None)
    norm = hook.norm if hook is not None else engine.get_global_grad_norm()
    return float("nan") if norm is None else float(norm)


def update_applied(engine: Any) -> bool:
    """Whether the last ``engine.step()`` changed the weights: False when its gradient norm was not finite (every
    ZeRO stage and dtype skips such an update; the LR schedule does not advance)."""
    return bool(engine.was_step_applied())


def optimizer_settings(engine: Any) -> tuple[list[dict[str, Any]], list[float]]:
    """What this learner's config set in the optimizer (every group's hyperparameters but its parameters and
    rates) and the schedule's base rates: what a resume re-applies over a checkpoint's (``apply_optimizer_settings``)."""
    schedule = engine.lr_scheduler
    groups = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
              for g in schedule.optimizer.param_groups]
    return groups, list(schedule.base_lrs)


def apply_optimizer_settings(engine: Any, settings: tuple[list[dict[str, Any]], list[float]]) -> None:
    """After a checkpoint load: the config's hyperparameters and base rates at the loaded schedule position (the
    moments and the step count stay the checkpoint's), so a resume with a changed learning rate trains at it.
    With the checkpoint's own config this recomputes the rates it held, to the bit."""
    groups, base_lrs = settings
    schedule = engine.lr_scheduler
    schedule.base_lrs = list(base_lrs)
    rates = [base * fn(schedule.last_epoch) for base, fn in zip(base_lrs, schedule.lr_lambdas)]
    for group, fresh, base, rate in zip(schedule.optimizer.param_groups, groups, base_lrs, rates):
        group.update(fresh)
        group["initial_lr"], group["lr"] = base, rate
    schedule._last_lr = rates


def current_lr(engine: Any) -> float:
    """The learning rate the engine's next step will use."""
    return float(engine.get_lr()[0])


# ------------------------------------------------------------------------------------------ ZeRO-3 gathers
@contextmanager
def full_parameters(params: Iterable[nn.Parameter], enabled: bool = True) -> Iterator[None]:
    """Inside the block every parameter holds its full value on every rank (ZeRO-3: an all-gather, which
    ALL ranks must enter together; otherwise a no-op)."""
    params = [p for p in params if hasattr(p, "ds_id")] if enabled else []
    if not params:
        with nullcontext():
            yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def iter_full_state(
    module: nn.Module, bucket_bytes: int = 64 << 20, to_cpu: bool = True,
    keep: Optional[Callable[[str], bool]] = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter, then every persistent buffer, gathered a bucket of
    parameters at a time so memory holds one bucket beyond the shards.

    A collective under ZeRO-3: every rank must drive the generator to its end (rank 0 keeps the tensors,
    the others may drop them). Names are those of ``module.named_parameters()`` / ``state_dict()``; a tied
    parameter appears once, under its first name. ``keep``: only the names it accepts (and only they are gathered).
    """
    names = {id(p): n for n, p in module.named_parameters()}
    params = [p for p in module.parameters() if keep is None or keep(names[id(p)])]
    bucket: list[nn.Parameter] = []
    size = 0

    def flush() -> Iterator[tuple[str, torch.Tensor]]:
        with full_parameters(bucket):
            for p in bucket:
                t = p.detach()
                yield names[id(p)], (t.to("cpu", copy=True) if to_cpu else t.clone())

    for p in params:
        n = int(getattr(p, "ds_numel", p.numel())) * p.element_size()
        if bucket and size + n > bucket_bytes:
            yield from flush()
            bucket, size = [], 0
        bucket.append(p)
        size += n
    if bucket:
        yield from flush()
    persistent = set(module.state_dict(keep_vars=True).keys())
    for name, buf in module.named_buffers():
        if name in persistent and buf is not None and (keep is None or keep(name)):
            yield name, (buf.detach().to("cpu", copy=True) if to_cpu else buf.detach().clone())
