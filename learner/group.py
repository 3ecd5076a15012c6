"""The learner's Ray shell: N ``LearnerWorker`` actors in one placement group, one DeepSpeed ZeRO group.

The only Ray-aware part of the learner (an ``ActorGroup``): it finds a free port on rank 0's node, starts the
ranks with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, and fans each call out to every rank.
Methods are named (no string RPC); a ``submit_*`` method returns one ObjectRef per rank, its plain twin blocks
and returns rank 0's answer (the ranks agree).

    group = LearnerGroup(cfg)                           # ~ start-up: actors, process group, engines
    metrics = group.train(chain_refs, advantages, keep) # GRPO: one ChainAdvantage per chain
    metrics = group.sft(records)                        # cold start: data.sft_targets.SFTRecords
    update, _ = group.publish_weights(version)          # for the rollout actors
    group.save_checkpoint(path); group.export_hf(path)
    group.shutdown()
"""

from __future__ import annotations

import socket
import time
from typing import Any, Optional, Sequence

import ray

from core.actor_group import READY_TIMEOUT_S, ActorGroup
from core.config import ExperimentConfig
from core.env import worker_env
from core.records import ChainAdvantage, WeightUpdate
from learner.batching import contiguous_sizes
from learner.worker import LearnerWorker


@ray.remote(num_cpus=0)
def _master_address(port: Optional[int]) -> tuple[str, int]:
    """Rank 0's node address and a port free on it (runs inside rank 0's bundle, so on its node).

    The port is released before rank 0 binds it; another process could take it in between (the usual
    race of this pattern, rare; set learner.master_port to pin one)."""
    if port is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), int(port)



class LearnerGroup(ActorGroup):
    """N learner ranks as Ray actors (``learner.num_ranks``), one ZeRO group."""

    def __init__(self, cfg: ExperimentConfig, **worker_kwargs: Any):
        """Blocks until every rank has built its engines. ``worker_kwargs`` go to ``LearnerWorker``
        (e.g. ``logprob_temperature``)."""
        ln = cfg.learner
        worker_kwargs.setdefault("sft", cfg.sft if cfg.mode == "sft" else None)  # sft_step needs it
        if ln.backend == "nccl" and ln.num_gpus <= 0:
            raise ValueError(f"learner.backend = nccl needs learner.num_gpus > 0, got {ln.num_gpus}")
        super().__init__("learner", ln.num_ranks, ln.num_cpus, ln.num_gpus, cfg.ray.placement_strategy,
                         f"{cfg.name}-learner")
        self.num_ranks, self.timeout_s = ln.num_ranks, ln.call_timeout_s
        try:
            addr, port = ray.get(_master_address.options(scheduling_strategy=self.bundle(0)).remote(ln.master_port))
        except BaseException:
            self.shutdown()
            raise

        def rank_args(rank: int) -> tuple[tuple, dict]:
            dist_env = {"RANK": str(rank), "WORLD_SIZE": str(ln.num_ranks), "MASTER_ADDR": addr,
                        "MASTER_PORT": str(port),
                        # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES: its device is always cuda:0
                        "LOCAL_RANK": "0"}
            return (ln, cfg.policy, cfg.diffusion, cfg.grpo, cfg.trainer.total_steps, dist_env), worker_kwargs

        self.start(LearnerWorker, rank_args, runtime_env={"env_vars": worker_env()})
        self.master = (addr, port)
        try:
            self.infos: list[dict[str, Any]] = ray.get([a.info.remote() for a in self.actors], timeout=READY_TIMEOUT_S)
        except BaseException:
            self.shutdown()  # a rank that failed to build: release the others and the bundles
            raise
        self.trained = tuple(m for m, frozen in (("policy", cfg.policy.freeze), ("diffusion", cfg.diffusion.freeze))
                             if not frozen)

    # ------------------------------------------------------------------ training
    def submit_train(self, chains: Sequence[ray.ObjectRef], advantages: Sequence[ChainAdvantage],
                     keep: Sequence[bool], version: Optional[int] = None,
                     max_staleness: Optional[int] = None) -> list[ray.ObjectRef]:
        """One GRPO update from chain refs: kept chains are split contiguously over the ranks, and each rank
        fetches and batches its own (the driver never touches tokens or pixels). ``advantages``: one
        ``ChainAdvantage`` per chain (text, and the images' and sections' own when they have them).
        ``version``: the policy version the learner holds; chains sampled by an older one are stale and get the
        off-policy correction (``learner.off_policy``), and those more than ``max_staleness`` versions old are not
        trained on; None: all treated as on-policy."""
        kept = [i for i, k in enumerate(keep) if k]
        if not kept:
            raise ValueError("every group was filtered: the driver must skip the learner for this step")
        sizes = contiguous_sizes(len(kept), self.num_ranks)
        refs, lo = [], 0
        for actor, size in zip(self.actors, sizes):
            idx = kept[lo:lo + size]
            lo += size
            if idx:
                refs.append(actor.train_chains.remote([advantages[i] for i in idx], False,
                                                      *[chains[i] for i in idx], version=version,
                                                      max_staleness=max_staleness))
            else:  # fewer chains than ranks: a zero-loss copy keeps the collectives in step
                refs.append(actor.train_chains.remote([ChainAdvantage(0.0)], True, chains[kept[0]],
                                                      version=version, max_staleness=max_staleness))
        return refs

    def train(self, chains: Sequence[ray.ObjectRef], advantages: Sequence[ChainAdvantage],
              keep: Sequence[bool], version: Optional[int] = None,
              max_staleness: Optional[int] = None) -> dict[str, float]:
        """Metrics of the update, aggregated over ranks."""
        return self.wait(self.submit_train(chains, advantages, keep, version, max_staleness), self.timeout_s,
                         "its GRPO step")[0]

    def submit_sft(self, records: Sequence[Any]) -> list[ray.ObjectRef]:
        """One supervised cold-start step on ``data.sft_targets.SFTRecord``s (or refs to them): contiguous shards
        per rank; a rank left without records trains a zero-weight copy of the first (no loss, no gradient)
        so that its collectives stay in step."""
        if not records:
            raise ValueError("sft: no records")
        shards = self._record_shards(records)
        return [actor.sft_step.remote(*shard) for actor, shard in zip(self.actors, shards)]

    def _record_shards(self, records: Sequence[Any]) -> list[list[Any]]:
        """Contiguous shards of SFTRecords (or refs) per rank; a rank left without gets a zero-weight copy of
        the first (no loss, no gradient), so that its collectives stay in step."""
        shards, lo = [], 0
        for size in contiguous_sizes(len(records), self.num_ranks):
            shards.append(list(records[lo:lo + size]))
            lo += size
        if all(shards):
            return shards
        first = records[0] if not isinstance(records[0], ray.ObjectRef) else ray.get(records[0])
        return [shard or [first.zero_weight()] for shard in shards]

    def sft(self, records: Sequence[Any]) -> dict[str, float]:
        """Metrics of the step, aggregated over ranks (``LearnerWorker.sft_step``)."""
        return self.wait(self.submit_sft(records), self.timeout_s, "its SFT step")[0]

    def publish_weights(self, version: int, models: Sequence[str] = ("policy", "diffusion")
                        ) -> tuple[WeightUpdate, dict[str, float]]:
        """Gather the trained models' full weights on rank 0 into safetensors buckets left in the object
        store; returns a WeightUpdate of refs for the rollout actors (nothing passes through the driver)."""
        start = time.perf_counter()
        refs: dict[str, tuple] = {}
        metrics: dict[str, float] = {}
        for model in models:
            if model not in self.trained:
                continue
            outs = [a.serialized_state.options(num_returns=2).remote(model) for a in self.actors]
            blobs_ref, stats_ref = outs[0]
            stats = self.wait([o[1] for o in outs], self.timeout_s, f"the {model} gather")[0]  # every rank took part
            refs[model] = (blobs_ref,)
            metrics[f"weight_sync/{model}_mb"] = stats["bytes"] / 2**20
            metrics[f"weight_sync/{model}_buckets"] = stats["buckets"]
            if "adapter_bytes" in stats:  # what shipping the LoRA adapters alone would move
                metrics[f"weight_sync/{model}_adapter_mb"] = stats["adapter_bytes"] / 2**20
        metrics["weight_sync/gather_s"] = time.perf_counter() - start
        update = WeightUpdate(version=version, policy=refs.get("policy", ()), diffusion=refs.get("diffusion", ()))
        return update, metrics

    # ------------------------------------------------------------------ weights
    def sync_address(self) -> tuple[str, int]:
        """Rank 0's node address and a free port on it, for a collective weight-sync group."""
        return ray.get(_master_address.options(scheduling_strategy=self.bundle(0)).remote(None))

    def submit_gather_full_state(self, model: str) -> list[ray.ObjectRef]:
        return [a.gather_full_state.remote(model) for a in self.actors]

    def gather_full_state(self, model: str) -> dict[str, Any]:
        """Rank 0's full CPU state dict of ``model`` ("policy" | "diffusion")."""
        return self.wait(self.submit_gather_full_state(model), self.timeout_s, f"the {model} gather")[0]

    def parameter_digests(self, model: str) -> list[dict[str, float]]:
        """Per-rank sums of each local parameter (replicas must agree under ZeRO 0-2)."""
        return ray.get([a.parameter_digest.remote(model) for a in self.actors])

    def submit_export_hf(self, directory: str) -> list[ray.ObjectRef]:
        return [a.export_hf.remote(str(directory)) for a in self.actors]

    def export_hf(self, directory: str) -> dict[str, str]:
        """HF/diffusers directories of both models under ``directory`` (written by rank 0)."""
        return self.wait(self.submit_export_hf(directory), self.timeout_s, "the export")[0]

    # ------------------------------------------------------------------ checkpoints
    def submit_save_checkpoint(self, directory: str) -> list[ray.ObjectRef]:
        return [a.save_checkpoint.remote(str(directory)) for a in self.actors]

    def save_checkpoint(self, directory: str) -> None:
        self.wait(self.submit_save_checkpoint(directory), self.timeout_s, "the checkpoint")

    def submit_load_checkpoint(self, directory: str) -> list[ray.ObjectRef]:
        return [a.load_checkpoint.remote(str(directory)) for a in self.actors]

    def load_checkpoint(self, directory: str) -> None:
        self.wait(self.submit_load_checkpoint(directory), self.timeout_s, "the checkpoint load")
