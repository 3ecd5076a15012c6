"""What a learner rank writes and gathers: full weights for the rollout actors (serialised buckets), the HF /
diffusers export, and DeepSpeed checkpoints, all owned by one ``Checkpointer`` over the rank's trained models.
Every method that gathers is a collective under ZeRO-3: all ranks must call it, in the same order.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from core.config import LearnerConfig
from core.weights import bucket_named_tensors, serialize_bucket
from learner import engine as eng
from learner.trained import TrainedModels
from models import lora

WORKER_STATE_FILE = "learner_state.json"
CHECKPOINT_TAG = "zero"  # DeepSpeed's tag subdirectory; fixed so a checkpoint dir holds exactly one state


class Checkpointer:
    """Persistence of one rank's trained models. ``paths``: each model's configured path (``policy.path``,
    ``diffusion.path``): a frozen model's export is a copy of it, and the SR export's base pipeline."""

    def __init__(self, models: TrainedModels, learner: LearnerConfig, paths: dict[str, str]):
        self.models, self.ctx = models, models.ctx
        self.bucket_bytes = learner.sync_bucket_mb << 20
        self.zero_stage = learner.zero_stage
        self.paths = paths

    def serialized_state(self, model: str) -> tuple[list[bytes], dict[str, float]]:
        """Rank 0: the full weights of ``model`` as safetensors buckets of ``learner.sync_bucket_mb`` (ready for
        the object store); other ranks: []. A collective (ZeRO-3 gathers): all ranks must call it."""
        start = time.perf_counter()
        state, adapter_bytes = self.sync_state(model)
        blobs = [serialize_bucket(b) for b in bucket_named_tensors(state.items(), self.bucket_bytes)]
        stats = {"bytes": float(sum(len(b) for b in blobs)), "buckets": float(len(blobs)),
                 "tensors": float(len(state)), "seconds": time.perf_counter() - start}
        if adapter_bytes is not None:
            stats["adapter_bytes"] = float(adapter_bytes)
        return blobs, stats

    def ships_adapters(self, model: str) -> bool:
        """``<model>.lora.sync: adapters``: a sync ships the adapters (and saved modules) alone."""
        trained = self._trained(model)
        return trained.lora is not None and trained.cfg.lora.sync == "adapters"

    def sync_state(self, model: str) -> tuple[dict[str, Tensor], int | None]:
        """What a weight sync ships of ``model`` (rank 0; {} on the others): the adapters alone by the adapted model's
        names (``ships_adapters``: only they are gathered), else the merged weights; and with LoRA the bytes the
        adapters alone are (None without). A collective, like ``gather_full_state``."""
        if self.ships_adapters(model):
            trained = self.gather_raw_state(model, keep=lora.is_trained)
            return trained, lora.adapter_bytes(trained)
        raw = self.gather_raw_state(model)
        return self.merged(model, raw), (lora.adapter_bytes(raw) if self._trained(model).lora is not None else None)

    def sync_metadata(self, model: str) -> dict[str, list]:
        """What ``sync_state`` will ship of ``model`` (names, dtype names, shapes in its order: vLLM's weight-transfer
        update info), without gathering anything: the same code runs on meta tensors of the full shapes (ZeRO-3's
        ``ds_shape``), LoRA merging included. Any rank; no collective."""
        from learner.transfer import update_info

        module = self.models.engine(model).module
        if self.ships_adapters(model):
            raise ValueError(f"{model}.lora.sync is adapters: the adapters travel to the rollout actors, not through "
                             "vLLM's weight transfer")
        raw = {}
        for name, p in module.named_parameters():
            raw[name] = torch.empty(tuple(getattr(p, "ds_shape", p.shape)), dtype=p.dtype, device="meta")
        persistent = set(module.state_dict(keep_vars=True).keys())
        for name, buf in module.named_buffers():
            if name in persistent and buf is not None:
                raw[name] = torch.empty(tuple(buf.shape), dtype=buf.dtype, device="meta")
        return update_info(self.merged(model, raw).items())

    def gather_full_state(self, model: str) -> dict[str, Tensor]:
        """Full CPU weights of ``model`` ("policy" | "diffusion") on rank 0 by the base model's names (LoRA adapters
        merged in), {} on the others. A collective: ALL ranks must call it (ZeRO-3 all-gathers, a bucket at a time)."""
        return self.merged(model, self.gather_raw_state(model))

    def gather_raw_state(self, model: str, keep: Callable[[str], bool] | None = None) -> dict[str, Tensor]:
        """``gather_full_state`` as the trained module holds it: with LoRA, base layers and adapters apart; ``keep``:
        only the names it accepts."""
        module = self.models.engine(model).module
        full = eng.iter_full_state(module, bucket_bytes=self.bucket_bytes, keep=keep)
        if self.ctx.rank == 0:
            return dict(full)
        for _ in full:
            pass
        return {}

    def merged(self, model: str, raw: dict[str, Tensor]) -> dict[str, Tensor]:
        """The base model's state from a gathered one: adapters merged (``lora.merge_lora``) when ``model`` has them."""
        scaling = self._trained(model).lora
        return lora.merge_lora(raw, scaling) if scaling is not None and raw else raw

    def parameter_digest(self, model: str) -> dict[str, float]:
        """Sum of each parameter as this rank holds it (its shard under ZeRO-3). Equal on every rank for
        ZeRO 0-2, whose ranks keep full replicas: a cheap check that replicas did not diverge."""
        module = self.models.engine(model).module
        return {
            n: float(getattr(p, "ds_tensor", p).detach().double().sum()) for n, p in module.named_parameters()
        }

    def export_hf(self, directory: str) -> dict[str, str]:
        """Write ``directory/policy`` (HF: weights, config, processor; loadable by from_pretrained and vLLM)
        and ``directory/diffusion`` (the diffusers pipeline) on rank 0. A frozen model is copied from its
        configured path. A collective under ZeRO-3: all ranks must call it. Returns {model: path} on rank 0.
        """
        out = Path(directory)
        written: dict[str, str] = {}
        policy, sr, rank0 = self.models.policy, self.models.sr, self.ctx.rank == 0
        if policy is not None:
            raw = self.gather_raw_state("policy")
            if rank0:
                target = out / "policy"
                policy.engine.module.save_pretrained(target, state_dict=self.merged("policy", raw),
                                                     safe_serialization=True)
                policy.tokens.processor.save_pretrained(target)
                written["policy"] = str(target)
                written.update(self._save_adapter("policy", raw, out))
        elif rank0:
            written["policy"] = _copy_dir(self.paths["policy"], out / "policy")
        if sr is not None and sr.lora is not None:
            raw = self.gather_raw_state("diffusion")
            if rank0:
                written["diffusion"] = self._save_merged_pipeline(self.merged("diffusion", raw), out / "diffusion")
                written.update(self._save_adapter("diffusion", raw, out))
        elif sr is not None:
            module = sr.engine.module
            # diffusers' save_pretrained takes no state_dict: gather the whole module for the save
            with eng.full_parameters(module.parameters()):
                if rank0:
                    module.sr.pipe.save_pretrained(out / "diffusion")
                    written["diffusion"] = str(out / "diffusion")
        elif rank0:
            written["diffusion"] = _copy_dir(self.paths["diffusion"], out / "diffusion")
        self.ctx.barrier()
        return written

    def _save_adapter(self, model: str, raw: dict[str, Tensor], out: Path) -> dict[str, str]:
        """``out/<model>_adapter``: the adapters alone in peft's format (nothing without LoRA)."""
        trained = self._trained(model)
        if trained.lora is None:
            return {}
        path = lora.save_adapter(out / f"{model}_adapter", raw, trained.cfg.lora, trained.lora, self.paths[model])
        return {f"{model}_adapter": str(path)}

    def _save_merged_pipeline(self, state: dict[str, Tensor], target: Path) -> str:
        """The diffusers pipeline with the merged weights: a fresh copy of the base pipeline (the trained one holds
        peft layers, whose names diffusers would save) takes the merged state, strictly, and is saved."""
        from learner.scoring import TraceScorer, load_sr_pipeline

        pipeline = load_sr_pipeline(self.paths["diffusion"])
        TraceScorer(pipeline).to(next(iter(state.values())).dtype).load_state_dict(state, strict=True)
        pipeline.save_pretrained(target)
        return str(target)

    def save(self, directory: str, optimizer_steps: int) -> None:
        """DeepSpeed checkpoint of every trained model (weights, optimizer and LR-scheduler state, each rank
        its own ZeRO shard) under ``directory/<model>/``, and the learner's ``optimizer_steps``. All ranks;
        ``directory`` must be on storage every rank can reach (one node, or a shared filesystem)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        trained = self.models.trained()
        for name, m in trained.items():
            m.engine.save_checkpoint(str(out / name), tag=CHECKPOINT_TAG,
                                     client_state={"optimizer_steps": optimizer_steps})
        if self.ctx.rank == 0:
            state = {
                "optimizer_steps": optimizer_steps,
                "trained": sorted(trained),
                "world_size": self.ctx.world_size,
                "zero_stage": self.zero_stage,
            }
            (out / WORKER_STATE_FILE).write_text(json.dumps(state, indent=1))
        self.ctx.barrier()

    def load(self, directory: str) -> int:
        """Restore what ``save`` wrote (same world size and ZeRO stage) and return its ``optimizer_steps``. All
        ranks. The optimizer's moments and the schedule's position are the checkpoint's, its hyperparameters and
        base rates this learner's config's (a resume that changed them was accepted: ``core.run_folder``)."""
        src = Path(directory)
        state_file = src / WORKER_STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"{state_file}: not a learner checkpoint (missing {WORKER_STATE_FILE})")
        state = json.loads(state_file.read_text())
        trained = self.models.trained()
        missing = sorted(set(trained) - set(state.get("trained", [])))
        if missing:
            raise ValueError(f"{src}: checkpoint has no state for {missing} (trained then: {state.get('trained')})")
        for key, mine in (("world_size", self.ctx.world_size), ("zero_stage", self.zero_stage)):
            if state.get(key) != mine:
                raise ValueError(f"{state_file}: saved with {key}={state.get(key)}, this learner has {mine}")
        for name, m in trained.items():
            settings = eng.optimizer_settings(m.engine)  # this config's, re-applied over the checkpoint's
            path, _client_state = m.engine.load_checkpoint(
                str(src / name), tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if path is None:
                raise FileNotFoundError(f"{src / name}: DeepSpeed found no checkpoint (tag {CHECKPOINT_TAG!r})")
            eng.apply_optimizer_settings(m.engine, settings)
        return int(state["optimizer_steps"])

    def _trained(self, model: str) -> Any:
        """The trained model ``model`` (its engine checked: a frozen one is an error naming it)."""
        self.models.engine(model)
        return self.models.trained()[model]


def _copy_dir(src: str, dst: Path) -> str:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return str(dst)
