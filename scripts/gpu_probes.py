#!/usr/bin/env python
"""What one GPU without vLLM or Ray can check of the cluster's GPU path (scripts/gpu_check.sh runs these; part 7 of
the GPU-path review, /work/shared/notes/reviews-2026-12/gpu-path.md section 2).

    python scripts/gpu_probes.py PROBE [--tiny] [--device auto|cuda|cpu] [probe options]

    zero3-lora         the project's learner (learner.worker.LearnerWorker, world size 1, NCCL/bf16 on a GPU) with the
                       1-GPU recipe's LoRA on both models: 2 GRPO steps on HF-sampled chains under ZeRO-2 and under
                       ZeRO-3 from the same seed and data; the merged weights (learner.persistence.Checkpointer.gather_full_state) must
                       agree within bf16 tolerance, the ZeRO-3 export must load with from_pretrained (and its peft
                       adapters with peft), and a ZeRO-3 checkpoint must restore weights and optimizer state
    learner-7b-memory  a Qwen2.5-VL-7B-shaped policy (Qwen2_5_VLConfig with the 7B sizes, random bf16 weights built
                       on the device: no download) with gradient checkpointing, trained in full as
                       configs/grpo_8node.yaml does and then with the project's LoRA (models.lora.add_lora); one
                       learner micro-batch at the cluster's sizes through learner.scoring.policy_log_probs + backward:
                       peak memory and seconds, and the rank-0 sync gather (learner.engine.iter_full_state, LoRA merge)
    sr-cluster-batch   an SD-x4-upscaler-shaped SR pipeline (random UNet, VAE and text encoder with the upscaler's
                       config numbers): one rollout actor's batch of the cluster (prompts per actor x group size x
                       image branches) through the three chain stages at the cluster's sizes and steps, then one
                       re-scoring backward per stage through learner.scoring.TraceScorer: peak memory and seconds
    nccl-group         the weight-sync group (core.weight_broadcast.open_group, nccl on a GPU at world size 1, gloo on
                       the CPU at world size 2): one bucketed broadcast_weights; at world size 1 the root's tensors
                       must come back unchanged (there is no receiver: NCCL refuses two ranks on one GPU), with gloo a
                       receiver thread must get exactly what was sent

Each probe prints exactly ONE JSON line on stdout (everything else, library logs included, goes to stderr): the probe,
``ok``, the device, its measurements, ``checks`` (each assertion: ok and what was compared) and ``failures``. Exit
status: 0 all checks passed, 1 a check failed, 2 bad arguments, 3 the probe crashed (its JSON line says where).
``--tiny`` shrinks every size so the CPU runs a probe in seconds (the same code paths; the numbers are not the
cluster's). Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the process's peak RSS, which only
shows that the accounting runs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import resource
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = float(1 << 30)
CLUSTER_CONFIG = "configs/grpo_8node.yaml"  # the sizes the memory probes reproduce
RECIPE_CONFIG = "configs/grpo_1gpu.yaml"  # the LoRA recipe zero3-lora trains (and learner-7b-memory's LoRA)
# bf16 keeps 8 significant bits: two learners that agree to float rounding may still round a merged weight to
# neighbouring bf16 values. 1/64 relative is two to four bf16 steps; float32 (the CPU default) gets a tight one.
BF16_RTOL, FP32_RTOL = 1 / 64, 1e-5

# Qwen2.5-VL-7B-Instruct's config.json (checked against the published config and transformers' Qwen2.5-VL docs)
QWEN_7B_TEXT = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152_064,
                "max_position_embeddings": 128_000, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
                "mrope_section": [16, 24, 24]}
QWEN_7B_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                  "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                  "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2}
QWEN_7B_TOKENIZER_IDS = 151_665  # 151,643 BPE + 22 added; the embedding has 152,064 rows (399 padded)
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 56 * 56, 28 * 28 * 16384  # Qwen2.5-VL's preprocessor_config.json
# stabilityai/stable-diffusion-x4-upscaler's unet/, vae/, text_encoder/ and scheduler/ configs
SD_X4_UNET = {"sample_size": 128, "in_channels": 7, "out_channels": 4, "block_out_channels": (256, 512, 512, 1024),
              "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "CrossAttnDownBlock2D"),
              "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              "layers_per_block": 2, "attention_head_dim": 8, "cross_attention_dim": 1024, "num_class_embeds": 1000,
              "only_cross_attention": [True, True, True, False], "use_linear_projection": True,
              "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
              "downsample_padding": 1, "mid_block_scale_factor": 1}
SD_X4_VAE = {"in_channels": 3, "out_channels": 3, "block_out_channels": (128, 256, 512),
             "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3,
             "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32, "sample_size": 256,
             "scaling_factor": 0.08333}
SD_X4_TEXT = {"vocab_size": 49_408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
              "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 512}


class ProbeError(Exception):
    """A probe cannot run as asked (not a failed check): exit 3 with the message."""


# ============================================================================================ plumbing
class Checks:
    """The assertions of one probe: each is recorded (ok + what was compared); a failed one fails the probe but the
    probe goes on, so one run reports every failure."""

    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}

    def check(self, name: str, ok: bool, **detail: Any) -> bool:
        self.results[name] = {"ok": bool(ok), **{k: _jsonable(v) for k, v in detail.items()}}
        print(f"[check] {name}: {'ok' if ok else 'FAILED'} {detail}", file=sys.stderr, flush=True)
        return bool(ok)

    def close(self, name: str, value: float, limit: float, **detail: Any) -> bool:
        """``value <= limit`` (a tolerance check)."""
        return self.check(name, math.isfinite(value) and value <= limit, value=value, limit=limit, **detail)

    @property
    def failures(self) -> list[str]:
        return [n for n, r in self.results.items() if not r["ok"]]


def _jsonable(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    return str(v)


@contextlib.contextmanager
def json_stdout() -> Iterator[Callable[[dict], None]]:
    """Inside the block fd 1 goes to stderr (DeepSpeed's logger and C libraries print to stdout), so that stdout
    carries the JSON line alone; yields the function that writes it. fd 1 is restored after the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)

    def emit(line: dict) -> None:
        os.write(saved, (json.dumps(_jsonable(line)) + "\n").encode())

    try:
        yield emit
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def resolve_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ProbeError("--device cuda: torch sees no GPU")
    if name not in ("cuda", "cpu"):
        raise ProbeError(f"--device {name!r}: must be auto, cuda or cpu")
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device("cpu")


def device_info(device) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / GIB, cuda=torch.version.cuda)
    return info


class Memory:
    """Peak memory of a phase: the device's allocator peak on a GPU, the process's peak RSS on the CPU (which
    never goes down: on the CPU the numbers only show that the accounting runs)."""

    def __init__(self, device):
        self.device = device

    def reset(self) -> None:
        import torch

        if self.device.type == "cuda":  # (on the CPU nothing can be reset: skip the slow full collection)
            gc.collect()
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def allocated_gib(self) -> float:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / GIB
        return rss_gib()

    def peak_gib(self) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / GIB
        return peak_rss_gib()

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports KiB


def rss_gib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB
    except OSError:
        return peak_rss_gib()


@contextlib.contextmanager
def timed(into: dict[str, float], key: str, memory: Memory | None = None) -> Iterator[None]:
    """Seconds of the block (the device synchronised at both ends) into ``into[key]``."""
    if memory is not None:
        memory.sync()
    start = time.perf_counter()
    yield
    if memory is not None:
        memory.sync()
    into[key] = time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def compare_states(a: dict, b: dict, rtol: float, atol: float) -> dict[str, Any]:
    """How far state ``b`` is from ``a``, tensor by tensor, in float32: the worst excess over the tolerance
    ``|a - b| <= atol + rtol |a|`` (<= 0: within it), the largest absolute difference, how many elements differ at
    all, and names that only one side has."""

    worst, worst_name, max_abs, differ, total = -math.inf, "", 0.0, 0, 0
    for name in sorted(set(a) & set(b)):
        x, y = a[name].float(), b[name].float()
        if x.shape != y.shape:
            return {"excess": math.inf, "worst": name, "shape_mismatch": [list(x.shape), list(y.shape)]}
        if not x.numel():
            continue
        d = (x - y).abs()
        excess = float((d - (atol + rtol * x.abs())).max())
        if excess > worst:
            worst, worst_name = excess, name
        max_abs = max(max_abs, float(d.max()))
        differ += int((d > 0).sum())
        total += x.numel()
    return {"excess": worst, "worst": worst_name, "max_abs_diff": max_abs, "elements_differing": differ,
            "elements": total, "only_in_first": sorted(set(a) - set(b))[:5],
            "only_in_second": sorted(set(b) - set(a))[:5], "rtol": rtol, "atol": atol}


def compare_trained(before: dict, ref: dict, test: dict, rtol: float, atol_frac: float) -> dict[str, Any]:
    """Two trainings from the same ``before`` (ZeRO-2's ``ref``, ZeRO-3's ``test``): the relative norm of the
    difference of their changes, ||(test - before) - (ref - before)|| / ||ref - before||, and each element within
    ``rtol |ref| + atol_frac max|ref - before|`` (bf16 rounding of the weight plus a fraction of the largest training
    change: two correct learners may round a near-zero gradient to opposite signs, which Adam turns into a full
    step; a lost, stale or garbled update differs by the change itself)."""
    diff2 = ref2 = 0.0
    max_delta = 0.0
    for name in sorted(set(before) & set(ref) & set(test)):
        b, r, t = before[name].float(), ref[name].float(), test[name].float()
        if r.shape != t.shape:
            return {"rel_delta_norm": math.inf, "excess": math.inf, "worst": name}
        diff2 += float(((t - r) ** 2).sum())
        ref2 += float(((r - b) ** 2).sum())
        if r.numel():
            max_delta = max(max_delta, float((r - b).abs().max()))
    out = compare_states(ref, test, rtol, atol_frac * max_delta)
    out.update(rel_delta_norm=math.sqrt(diff2) / math.sqrt(ref2) if ref2 > 0 else math.inf,
               max_training_change=max_delta, atol_frac=atol_frac)
    return out


def moved(before: dict, after: dict) -> int:
    """How many tensors changed."""
    import torch

    return sum(not torch.equal(before[k], after[k]) for k in before if k in after)


# ============================================================================================ a. zero3-lora
def zero3_lora(args, checks: Checks) -> dict[str, Any]:
    """The probe in a temporary directory (models, export, checkpoint), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="zero3_lora_", dir=args.workdir) as root:
        return _zero3_lora(args, checks, Path(root))


def _zero3_lora(args, checks: Checks, root: Path) -> dict[str, Any]:
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from actors.chain_sampler import ChainSampler
    from actors.hf_engine import HFTextEngine
    from actors.text_engine import TextEngineSpec
    from core.chain import TEXT_TAGS
    from core.config import TinyDiffusionConfig, TinyPolicyConfig, load_config
    from core.dtypes import torch_dtype
    from core.records import ChainAdvantage, Sample
    from learner.worker import LearnerWorker
    from models.bootstrap import build_tiny_diffusion
    from models.sr_pipeline import SRPipeline
    from models.tiny import build_tiny_policy
    from rl.local_roles import local_dist_env

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    rtol = args.rtol if args.rtol is not None else (BF16_RTOL if dtype == "bfloat16" else FP32_RTOL)
    memory = Memory(device)
    t: dict[str, Any] = {}
    steps = args.steps or (1 if args.tiny else 2)
    overrides = [f"policy.path={root / 'policy'}", f"diffusion.path={root / 'diffusion'}", "cold_start=null",
                 "policy.init_from=null", "diffusion.init_from=null", f"learner.backend={'nccl' if cuda else 'gloo'}",
                 f"learner.dtype={dtype}", f"policy.dtype={dtype}", f"diffusion.dtype={dtype}",
                 f"trainer.total_steps={steps + 1}", f"trainer.seed={args.seed}", "learner.num_ranks=1"]
    if args.tiny:  # the recipe's shape at toy sizes: 1 prompt x 2 chains x 2 image branches, 8 px LR images,
        #            2 denoising steps, one micro-batch
        overrides += ["grpo.group_size=2", "grpo.image_group_size=2", "chain.max_stage_tokens=6",
                      "diffusion.num_steps=2", "learner.micro_batch_size=2", "data.hr_size=32",
                      "learner.num_cpus=2", "rollout.num_cpus=2"]
    prompts = args.prompts or (1 if args.tiny else 2)
    cfg_for = lambda stage: load_config(REPO / args.recipe, [*overrides, f"learner.zero_stage={stage}"])
    cfg = cfg_for(3)
    if cfg.policy.lora is None or cfg.diffusion.lora is None:
        raise ProbeError(f"{args.recipe}: zero3-lora needs policy.lora and diffusion.lora")
    # models: the recipe's tiny random models (configs/grpo_1gpu.yaml policy.tiny / diffusion.tiny) or smaller
    with timed(t, "build_models_s"):
        ptiny = (TinyPolicyConfig(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, num_kv_heads=1,
                                  vision_hidden_size=32, vision_depth=1, vision_heads=2)
                 if args.tiny else cfg.policy.tiny)
        dtiny = (TinyDiffusionConfig(block_out_channels=[16, 32], num_levels=2, text_hidden_size=32, text_layers=1,
                                     text_max_length=16) if args.tiny else cfg.diffusion.tiny)
        build_tiny_policy(ptiny, root / "policy")
        build_tiny_diffusion(dtiny, root / "diffusion", AutoTokenizer.from_pretrained(str(root / "policy")))
    # data: real chains from the HF engine and the SR pipeline (the rollout path of rl.one_process, no rewards)
    with timed(t, "sample_chains_s", memory):
        engine = HFTextEngine(TextEngineSpec(cfg.policy.path, cfg.rollout.sampling, cfg.chain.max_stage_tokens,
                                             dtype=dtype, device=str(device)))
        pipe = SRPipeline.from_pretrained(cfg.diffusion.path).to(device, torch_dtype(dtype))
        sampler = ChainSampler(engine, pipe, cfg.chain, cfg.diffusion, image_group_size=cfg.grpo.image_group_size)
        rng = np.random.default_rng(args.seed)
        lr = cfg.data.hr_size // cfg.data.scale
        samples = [Sample(i, f"random_{i}", rng.integers(0, 256, (lr, lr, 3), dtype=np.uint8), None, (), None)
                   for i in range(prompts)]
        torch.manual_seed(args.seed)
        chains = sampler.sample(samples, cfg.grpo.group_size, seed=args.seed)
        del engine, pipe, sampler
    G, M = cfg.grpo.group_size, cfg.grpo.image_group_size
    # advantages: zero-mean within each group, each image branch its own (what rl.advantages hands the learner)
    text_adv = [((i % G) - (G - 1) / 2) / G for i in range(len(chains))]
    sections = len(TEXT_TAGS)  # grpo.token_credit: section needs one advantage per written section
    advantages = [ChainAdvantage(a, sections=tuple(a * (j + 1) / sections for j in range(sections)),
                                 image_branches=tuple(a * (1 - 0.5 * b) if b % 2 == 0 else -a / (b + 1)
                                                      for b in range(M)) if M > 1 else None)
                  for a in text_adv]

    def build(stage: int) -> LearnerWorker:
        if cuda:  # the previous learner's memory back before the next one is built
            gc.collect()
            torch.cuda.empty_cache()
        torch.manual_seed(args.seed)  # the LoRA A matrices are drawn at add_lora: the same for every learner
        c = cfg_for(stage)
        start = time.perf_counter()
        worker = LearnerWorker.from_config(c, local_dist_env(), logprob_temperature=c.rollout.sampling.temperature)
        t.setdefault("learner_build_s", []).append(time.perf_counter() - start)
        return worker

    def train(worker: LearnerWorker, n: int) -> list[dict[str, float]]:
        metrics = []
        for _ in range(n):
            memory.sync()
            start = time.perf_counter()
            metrics.append(worker.train_chains(advantages, False, *chains))
            memory.sync()
            t.setdefault(f"step_zero{worker.cfg.zero_stage}_s", []).append(time.perf_counter() - start)
        return metrics

    out: dict[str, Any] = {"dtype": dtype, "chains": len(chains), "image_branches": M,
                           "tokens_per_chain": [int(r.token_ids.numel()) for r in chains][:4],
                           "recipe": args.recipe, "steps": steps}
    # 1. ZeRO-2: the reference
    with timed(t, "zero2_s", memory):
        w2 = build(2)
        before = {m: w2.gather_full_state(m) for m in ("policy", "diffusion")}
        shipped0 = {m: w2.sync_state(m) for m in ("policy", "diffusion")}
        m2 = train(w2, steps)
        after2 = {m: w2.gather_full_state(m) for m in ("policy", "diffusion")}
        shipped2 = {m: w2.sync_state(m) for m in ("policy", "diffusion")}
        del w2
    # 2. ZeRO-3, same seed and data
    memory.reset()
    with timed(t, "zero3_s", memory):
        w3 = build(3)
        out["zero3_info"] = {k: v for k, v in w3.info().items() if k in ("parameters", "trainable_parameters",
                                                                         "lora_layers", "zero_stage")}
        start3 = {m: w3.gather_full_state(m) for m in ("policy", "diffusion")}
        m3 = train(w3, steps)
        after3 = {m: w3.gather_full_state(m) for m in ("policy", "diffusion")}
        shipped3 = {m: w3.sync_state(m) for m in ("policy", "diffusion")}
    out["zero3_peak_gib"] = memory.peak_gib()
    bf16 = dtype == "bfloat16"
    delta_rtol = args.delta_rtol if args.delta_rtol is not None else (0.1 if bf16 else 1e-4)
    atol_frac = args.atol_frac if args.atol_frac is not None else (0.5 if bf16 else 1e-3)
    keys = ("rel_delta_norm", "excess", "worst", "max_abs_diff", "max_training_change", "elements")
    for model in ("policy", "diffusion"):
        checks.check(f"{model}_zero3_starts_where_zero2_did", compare_states(before[model], start3[model], 0, 0)
                     ["excess"] <= 0, tensors=len(start3[model]))
        n = moved(before[model], after2[model])
        checks.check(f"{model}_training_moved_the_merged_weights", n > 0, tensors_changed=n,
                     of=len(after2[model]))
        # the merged weights (gather_full_state: what from_pretrained and lora.sync: merged see), then the adapters
        # alone (sync_state: what lora.sync: adapters ships)
        for what, ref0, ref, test in (("merged", before, after2, after3), ("adapters", shipped0, shipped2, shipped3)):
            cmp = compare_trained(ref0[model], ref[model], test[model], rtol, atol_frac)
            out[f"{model}_{what}_zero3_vs_zero2"] = cmp
            checks.check(f"{model}_{what}_zero3_equals_zero2", cmp["excess"] <= 0 and cmp["rel_delta_norm"] <=
                         delta_rtol and not cmp.get("only_in_first") and not cmp.get("only_in_second") and
                         cmp.get("elements", 0) > 0, delta_rtol=delta_rtol, **{k: cmp.get(k) for k in keys})
    for key in ("text_loss", "image_loss", "policy_grad_norm", "diffusion_grad_norm"):
        a, b = [m[key] for m in m2 if key in m], [m[key] for m in m3 if key in m]
        out[f"{key}_zero2"], out[f"{key}_zero3"] = a, b
        if a and b:  # relative, on a floor of 1e-3 (a loss of zero-mean advantages can sit near 0)
            diff = max(abs(x - y) / max(abs(x), abs(y), 1e-3) for x, y in zip(a, b))
            checks.close(f"{key}_zero3_vs_zero2", diff, args.metric_rtol if args.metric_rtol is not None
                         else (0.05 if bf16 else 1e-4))
    out["text_first_epoch_ratio_mean"] = m3[0].get("text_first_epoch_ratio_mean")
    if out["text_first_epoch_ratio_mean"] is not None:  # HF rollout vs learner re-scoring: 1 up to the numerics
        checks.close("text_first_epoch_ratio_near_1", abs(out["text_first_epoch_ratio_mean"] - 1.0),
                     0.05 if dtype == "bfloat16" else 1e-3)
    # 3. the HF / diffusers / peft export of the ZeRO-3 learner loads
    with timed(t, "export_s", memory):
        written = w3.export_hf(str(root / "export"))
    with timed(t, "export_load_s"):
        out["export"] = sorted(written)
        export_checks(checks, written, after3, root, dtype)
    # 4. a ZeRO-3 checkpoint saves and reloads (weights exactly, optimizer state through one more identical step)
    with timed(t, "checkpoint_s", memory):
        w3.save_checkpoint(str(root / "ckpt"))
        nxt = train(w3, 1)[0]
        want = {m: w3.gather_full_state(m) for m in ("policy", "diffusion")}
        del w3
        fresh = build(3)
        fresh.load_checkpoint(str(root / "ckpt"))
        restored = {m: fresh.gather_full_state(m) for m in ("policy", "diffusion")}
        for model in ("policy", "diffusion"):
            cmp = compare_states(after3[model], restored[model], 0, 0)
            checks.check(f"{model}_checkpoint_restores_weights", cmp["excess"] <= 0, max_abs_diff=cmp["max_abs_diff"])
        checks.check("checkpoint_restores_optimizer_steps", fresh.optimizer_steps == steps,
                     optimizer_steps=fresh.optimizer_steps, want=steps)
        again = train(fresh, 1)[0]
        for model in ("policy", "diffusion"):  # Adam's next step reads the restored moments
            cmp = compare_trained(after3[model], want[model], fresh.gather_full_state(model), rtol, atol_frac)
            checks.check(f"{model}_checkpoint_step_equals_uninterrupted_step", cmp["excess"] <= 0 and
                         cmp["rel_delta_norm"] <= delta_rtol, max_abs_diff=cmp["max_abs_diff"],
                         rel_delta_norm=cmp["rel_delta_norm"],
                         loss=[nxt.get(f"{'text' if model == 'policy' else 'image'}_loss"),
                               again.get(f"{'text' if model == 'policy' else 'image'}_loss")])
        del fresh
    out["seconds"] = t
    return out


def export_checks(checks: Checks, written: dict[str, str], gathered: dict, root: Path, dtype: str) -> None:
    """The export's policy loads with ``from_pretrained`` and holds the gathered merged weights; the SR pipeline
    loads with diffusers and holds the gathered ones; the peft adapters load onto the base models (float32 on the
    CPU, within a bf16 step of the merged export)."""
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from core.dtypes import torch_dtype
    from learner.scoring import TraceScorer, load_sr_pipeline
    from models.policy import load_policy

    checks.check("export_has_models_and_adapters",
                 {"policy", "diffusion", "policy_adapter", "diffusion_adapter"} <= set(written),
                 written=sorted(written))
    policy = Qwen2_5_VLForConditionalGeneration.from_pretrained(written["policy"], dtype=torch_dtype(dtype))
    cmp = compare_states(gathered["policy"], policy.state_dict(), 0, 0)
    checks.check("export_policy_from_pretrained_equals_gathered", cmp["excess"] <= 0 and not cmp["only_in_first"],
                 max_abs_diff=cmp["max_abs_diff"], missing=cmp["only_in_first"])
    sr = TraceScorer(load_sr_pipeline(written["diffusion"])).state_dict()
    cmp = compare_states(gathered["diffusion"], sr, 0, 0)
    checks.check("export_diffusion_from_pretrained_equals_gathered", cmp["excess"] <= 0 and not cmp["only_in_first"],
                 max_abs_diff=cmp["max_abs_diff"])
    peft_policy = PeftModel.from_pretrained(load_policy(root / "policy", "float32", "cpu"),
                                            written["policy_adapter"]).merge_and_unload().state_dict()
    exported = {k: v.float() for k, v in policy.state_dict().items()}
    rtol = BF16_RTOL if dtype == "bfloat16" else FP32_RTOL
    cmp = compare_states(exported, peft_policy, rtol, 1e-5)
    checks.check("export_policy_adapter_loads_with_peft", cmp["excess"] <= 0, max_abs_diff=cmp["max_abs_diff"],
                 worst=cmp["worst"])
    base = TraceScorer(load_sr_pipeline(str(root / "diffusion")))
    peft_sr = PeftModel.from_pretrained(base, written["diffusion_adapter"]).merge_and_unload().state_dict()
    cmp = compare_states({k: v.float() for k, v in sr.items()}, peft_sr, rtol, 1e-5)
    checks.check("export_diffusion_adapter_loads_with_peft", cmp["excess"] <= 0, max_abs_diff=cmp["max_abs_diff"])


# ============================================================================================ b. learner-7b-memory
def qwen_7b_config(tokenizer, tiny: bool):
    """Qwen2.5-VL-7B's config (``--tiny``: the same structure at toy widths), the special ids from ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig

    text = dict(QWEN_7B_TEXT)
    vision = dict(QWEN_7B_VISION)
    if tiny:
        text.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=-(-len(tokenizer) // 64) * 64 + 64, max_position_embeddings=4096)
        vision.update(depth=2, hidden_size=64, intermediate_size=96, num_heads=2, out_hidden_size=128,
                      fullatt_block_indexes=[1])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|endoftext|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}
    mrope = text.pop("mrope_section")
    theta = text.pop("rope_theta")
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    if tiny:
        half = head_dim // 2
        mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    text.update(rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": mrope},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=False, use_cache=False)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


@functools.lru_cache(maxsize=4)
def chain_tokenizer(size: int, exact: bool = False):
    """``models.tokenizer.build_chain_tokenizer`` once per process (it trains a BPE: seconds)."""
    from models.tokenizer import build_chain_tokenizer

    return build_chain_tokenizer(size, exact=exact)


def qwen_tokens(tiny: bool):
    """ChainTokens at Qwen2.5-VL-7B's layout: a tokenizer with exactly its 151,665 ids (``models.tokenizer``'s
    synthetic BPE: the real one is not downloaded) and Qwen's image processor; ``tiny``: the 1k chain tokenizer."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from models.chain_tokens import ChainTokens
    from models.tiny import MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE, tiny_processor

    if tiny:
        return ChainTokens.from_processor(tiny_processor(chain_tokenizer(1024)))
    tokenizer = chain_tokenizer(QWEN_7B_TOKENIZER_IDS, exact=True)
    size = {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS}
    kw = {"size": size, "patch_size": PATCH_SIZE, "merge_size": MERGE_SIZE, "temporal_patch_size": TEMPORAL_PATCH_SIZE}
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**kw), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(**kw), chat_template=tokenizer.chat_template)
    return ChainTokens.from_processor(processor)


def cluster_chains(tokens, cluster, n: int, turn_tokens: int, seed: int) -> list:
    """``n`` chains as the cluster's rollout writes them: the prompt with the LR image, then each turn at the full
    ``turn_tokens`` budget (random regular ids closed by the turn's stop tag) followed by the stage's image section
    (rough, middle; the final image ends the chain). Images at the cluster's sizes (data.hr_size / data.scale times
    each stage's scale)."""
    import numpy as np
    import torch

    from core.chain import TURNS, stage_scales, stage_sizes
    from core.records import Rollout

    rng = np.random.default_rng(seed)
    lr_side = cluster.data.hr_size // cluster.data.scale
    sizes = stage_sizes((lr_side, lr_side), stage_scales(cluster.chain))
    special = set(tokens.tokenizer.all_special_ids) | set(tokens.stop_ids.values())
    regular = np.array([i for i in range(min(len(tokens.tokenizer), 150_000)) if i not in special])
    out = []
    for c in range(n):
        lr = rng.integers(0, 256, (lr_side, lr_side, 3), dtype=np.uint8)
        prompt = tokens.prompt_ids(lr, cluster.chain.prompt)
        ids, mask, images = [], [], [lr]
        for turn in TURNS:
            text = [int(x) for x in rng.choice(regular, turn_tokens - 1)] + [tokens.stop_ids[turn.stage]]
            ids += text
            mask += [1] * len(text)
            if turn is not TURNS[-1]:
                image = rng.integers(0, 256, (*sizes[turn.stage], 3), dtype=np.uint8)
                section = tokens.image_section_ids(turn.stage, image)
                ids += section
                mask += [0] * len(section)
                images.append(image)
        m = torch.tensor(mask)
        out.append(Rollout(prompt_id=c // 2, sample_index=c % 2, policy_version=0, diffusion_version=0,
                           prompt_ids=torch.tensor(prompt), token_ids=torch.tensor(ids), text_mask=m,
                           log_probs=torch.where(m.bool(), torch.full((len(ids),), -2.0), torch.zeros(())),
                           text="", images={}, context_images=images, traces=()))
    return out


def learner_7b_memory(args, checks: Checks) -> dict[str, Any]:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from core.config import load_config
    from core.grpo import build_train_batch
    from learner import engine as eng
    from learner.scoring import policy_log_probs
    from models import lora

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if (args.dtype or ("bfloat16" if cuda else "float32")) == "bfloat16" else torch.float32
    memory = Memory(device)
    cluster = load_config(REPO / args.config)
    t: dict[str, float] = {}
    mb = args.micro_batch or cluster.learner.micro_batch_size
    turn_tokens = args.turn_tokens or (8 if args.tiny else cluster.chain.max_stage_tokens)
    out: dict[str, Any] = {"config": args.config, "micro_batch": mb, "turn_tokens": turn_tokens,
                           "dtype": str(dtype).removeprefix("torch."),
                           "gradient_checkpointing": bool(cluster.policy.gradient_checkpointing)}
    with timed(t, "tokenizer_s"):
        tokens = qwen_tokens(args.tiny)
    with timed(t, "chains_s"):
        if args.tiny:  # the cluster's layout at toy sizes: LR 32 px (stages 32 / 64), toy turns
            cluster = load_config(REPO / args.config, ["data.hr_size=128"])
        rollouts = cluster_chains(tokens, cluster, mb, turn_tokens, args.seed)
        batch = build_train_batch(rollouts, torch.linspace(-1, 1, mb), pad_token_id=tokens.tokenizer.pad_token_id)
    out["tokens_per_chain"] = [int(r.prompt_ids.numel() + r.token_ids.numel()) for r in rollouts]
    out["image_tokens_per_chain"] = [tokens.num_image_tokens(im) for im in rollouts[0].context_images]
    out["image_sizes"] = [list(im.shape[:2]) for im in rollouts[0].context_images]
    memory.reset()
    with timed(t, "build_model_s", memory):
        torch.manual_seed(args.seed)
        config = qwen_7b_config(tokens.tokenizer, args.tiny)
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
        model.train()
    params = list(model.parameters())
    out["parameters"] = sum(p.numel() for p in params)
    out["weights_gib"] = nbytes(params) / GIB
    out["after_build_gib"] = memory.allocated_gib()
    if not args.tiny:
        checks.check("parameters_are_7b_shaped", 8.0e9 < out["parameters"] < 8.6e9, parameters=out["parameters"])
    base_names = set(model.state_dict())  # what a sync ships: the base model's names
    if cluster.policy.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    variants = [v for v in args.variants.split(",") if v]
    for variant in variants:
        if variant == "lora":
            lora_cfg = cluster.policy.lora or load_config(REPO / args.lora_config, ["cold_start=null"]).policy.lora
            if lora_cfg is None:
                raise ProbeError(f"--lora-config {args.lora_config}: has no policy.lora")
            scalings = lora.add_lora(model, lora_cfg, "policy.lora")  # what LearnerWorker does, in its order
            if cluster.policy.gradient_checkpointing:
                model.enable_input_require_grads()
            model.to(device, dtype)  # DeepSpeed's bf16 engine casts the adapters too (peft makes them float32)
            out["lora_config"] = {"rank": lora_cfg.rank, "alpha": lora_cfg.alpha, "layers": len(scalings),
                                  "source": args.config if cluster.policy.lora else args.lora_config}
        elif variant != "full":
            raise ProbeError(f"--variants: {variant!r} is not full or lora")
        trained = [p for p in model.parameters() if p.requires_grad]
        res: dict[str, Any] = {"trainable_parameters": sum(p.numel() for p in trained)}
        for attempt in range(2):  # the first pass pays for kernels' set-up; the second is the steady state
            model.zero_grad(set_to_none=True)
            memory.reset()
            base = memory.allocated_gib()
            with timed(res, f"fwd_bwd_s_{attempt}", memory):
                logp = policy_log_probs(model, tokens, batch, rollouts, device, cluster.rollout.sampling.temperature)
                mask = batch.loss_mask.to(device)
                loss = -(logp * mask).sum() / mask.sum()
                loss.backward()
            res.update(peak_gib=memory.peak_gib(), before_gib=base, loss=loss.item())
        grads = [p.grad for p in trained if p.grad is not None]
        res["grads_gib"] = nbytes(grads) / GIB
        res["activation_peak_gib"] = res["peak_gib"] - res["before_gib"]  # what a ZeRO-3 rank adds to its shards
        checks.check(f"{variant}_log_probs_finite", bool(torch.isfinite(logp).all()) and math.isfinite(res["loss"]),
                     loss=res["loss"])
        norm = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads))) if grads else 0.0
        checks.check(f"{variant}_gradients_finite_and_nonzero", len(grads) == len(trained) and 0 < norm < math.inf,
                     grad_norm=norm, with_grad=len(grads), trainable=len(trained))
        if args.max_peak_gib is not None:
            checks.close(f"{variant}_peak_within_limit", res["peak_gib"], args.max_peak_gib)
        del logp, loss, grads
        model.zero_grad(set_to_none=True)
        memory.reset()
        if not args.skip_gather:  # rank 0's share of a sync: the state to the CPU, by sync_bucket_mb buckets
            bucket = cluster.learner.sync_bucket_mb << 20
            if variant == "lora":  # lora.sync: adapters (the default) gathers and ships the adapters alone
                with timed(res, "iter_adapters_s", memory):
                    adapters = dict(eng.iter_full_state(model, bucket_bytes=bucket, keep=lora.is_trained))
                res["adapters_gib"] = nbytes(adapters.values()) / GIB
                del adapters
            with timed(res, "iter_full_state_s", memory):
                state = dict(eng.iter_full_state(model, bucket_bytes=bucket))
            res["full_state_gib"] = nbytes(state.values()) / GIB
            if variant == "lora":  # lora.sync: merged
                with timed(res, "merge_lora_s"):
                    merged = lora.merge_lora(state, scalings)
                res["merged_gib"] = nbytes(merged.values()) / GIB
                checks.check("lora_merge_gives_the_base_models_names", set(merged) == base_names,
                             tensors=len(merged), missing=sorted(base_names - set(merged))[:3],
                             extra=sorted(set(merged) - base_names)[:3])
                del merged
            del state
        out[variant] = res
    out["seconds"] = t
    return out


# ============================================================================================ c. sr-cluster-batch
def sd_x4_pipeline(tokenizer, tiny: bool, device, dtype):
    """An SRPipeline shaped like stabilityai/stable-diffusion-x4-upscaler (UNet, VAE, OpenCLIP-H text encoder,
    v-prediction DDIM with scaled-linear betas), random weights built on ``device``; ``tiny``: the same structure at
    toy widths. The text encoder reads the policy's tokenizer (as models.bootstrap's SR model does)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.sr_pipeline import MAX_NOISE_LEVEL, SRPipeline

    unet_kw, vae_kw, text_kw = dict(SD_X4_UNET), dict(SD_X4_VAE), dict(SD_X4_TEXT)
    if tiny:  # one level fewer (sizes multiples of 16 with the VAE's 4), toy widths
        unet_kw.update(block_out_channels=(16, 16, 32), norm_num_groups=8, attention_head_dim=2,
                       cross_attention_dim=32, layers_per_block=1, down_block_types=unet_kw["down_block_types"][:3],
                       up_block_types=unet_kw["up_block_types"][1:], only_cross_attention=[True, True, False])
        vae_kw.update(block_out_channels=(8, 8, 16), norm_num_groups=8, layers_per_block=1)
        text_kw.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       projection_dim=32)
    text_kw["vocab_size"] = max(text_kw["vocab_size"], len(tokenizer))
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_kw, pad_token_id=tokenizer.pad_token_id,
                                                    bos_token_id=tokenizer.bos_token_id or tokenizer.pad_token_id,
                                                    eos_token_id=tokenizer.eos_token_id))
        unet = UNet2DConditionModel(**unet_kw)
        vae = AutoencoderKL(**vae_kw)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=1e-4, beta_end=0.02,
                              prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    low_res = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=1e-4, beta_end=0.02)
    pipe = SRPipeline(text_encoder, tokenizer, unet, scheduler, low_res, vae=vae, max_noise_level=MAX_NOISE_LEVEL)
    return pipe.to(device, dtype)


def sr_cluster_batch(args, checks: Checks) -> dict[str, Any]:
    import numpy as np
    import torch

    from core.chain import STAGES, stage_scales, stage_sizes
    from core.config import load_config
    from core.grpo import trained_steps
    from learner.scoring import TraceScorer
    from models.sr_pipeline import StepSettings

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if (args.dtype or ("bfloat16" if cuda else "float32")) == "bfloat16" else torch.float32
    memory = Memory(device)
    cluster = load_config(REPO / args.config)
    d, g = cluster.diffusion, cluster.grpo
    prompts_per_actor = args.prompts or math.ceil(g.prompts_per_step / cluster.rollout.num_actors)
    group = args.group or g.group_size
    batch = prompts_per_actor * group * g.image_group_size  # one ChainSampler diffusion call per stage
    steps = args.steps or d.num_steps
    lr_side = args.lr_size or cluster.data.hr_size // cluster.data.scale
    if args.tiny:
        prompts_per_actor, group, steps, lr_side = (args.prompts or 2), (args.group or 2), (args.steps or 2), \
            (args.lr_size or 16)
        batch = prompts_per_actor * group * g.image_group_size
    sizes = stage_sizes((lr_side, lr_side), stage_scales(cluster.chain))
    mb = (args.micro_batch or cluster.learner.micro_batch_size) * g.image_group_size  # traces a re-scoring call sees
    t: dict[str, float] = {}
    out: dict[str, Any] = {"config": args.config, "images_per_stage": batch, "prompts_per_actor": prompts_per_actor,
                           "group_size": group, "image_group_size": g.image_group_size, "num_steps": steps,
                           "stage_sizes": {s: list(sizes[s]) for s in STAGES}, "dtype": str(dtype)[6:],
                           "rescore_traces": mb, "guidance_scale": d.guidance_scale}
    memory.reset()
    with timed(t, "build_s", memory):
        torch.manual_seed(args.seed)
        pipe = sd_x4_pipeline(chain_tokenizer(1024), args.tiny, device, dtype)
    out["parameters"] = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
                         for name in ("unet", "vae", "text_encoder")}
    out["weights_gib"] = memory.allocated_gib()
    rng = np.random.default_rng(args.seed)
    condition = [rng.integers(0, 256, (lr_side, lr_side, 3), dtype=np.uint8) for _ in range(batch)]
    prompts = ["a detailed photograph with sharp edges and fine texture"] * batch
    stages: dict[str, Any] = {}
    traces: dict[str, list] = {}
    for stage in STAGES:  # rollout: the three stages in turn, each conditioned on the previous stage's images
        memory.reset()
        res: dict[str, Any] = {"latent": list(pipe.latent_size(sizes[stage]))}
        generators = [torch.Generator().manual_seed(args.seed * 1000 + i) for i in range(batch)]
        with timed(res, "seconds", memory):
            images, tr = pipe.sample(condition, sizes[stage], prompts, num_steps=steps, generator=generators,
                                     stage=stage, settings=StepSettings.from_config(d))
        res["peak_gib"] = memory.peak_gib()
        ok = len(images) == batch and all(im.shape == (*sizes[stage], 3) for im in images) and \
            all(bool(torch.isfinite(x.log_probs).all()) for x in tr)
        checks.check(f"sample_{stage}_images_and_traces", ok, images=len(images), size=list(sizes[stage]))
        stages[stage], traces[stage], condition = res, tr, images
    out["sample"] = stages
    out["sample_peak_gib"] = max(s["peak_gib"] for s in stages.values())
    out["sample_seconds"] = sum(s["seconds"] for s in stages.values())
    # learner: the trainable parts (UNet + text encoder) as the one module DeepSpeed wraps; one trained step of a
    # micro-batch's traces per stage, with grad (here without DeepSpeed: full grads on one device)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    scorer = TraceScorer(pipe).requires_grad_(True).train()
    rescore: dict[str, Any] = {}
    for stage in STAGES:
        k = list(trained_steps(steps, d.train_steps_fraction, d.train_steps_start))
        scorer.zero_grad(set_to_none=True)
        memory.reset()
        res = {"step": k[0], "before_gib": memory.allocated_gib()}
        with timed(res, "seconds", memory):
            logp = scorer(traces[stage][:mb], step_indices=[k[0]])  # (mb, 1), grad through UNet + text encoder
            loss = -logp.float().mean()
            loss.backward()
        res["peak_gib"] = memory.peak_gib()
        grads = [p.grad for p in scorer.parameters() if p.grad is not None]
        res["grads_gib"] = nbytes(grads) / GIB
        norm = float(torch.sqrt(sum((x.float() ** 2).sum() for x in grads))) if grads else 0.0
        checks.check(f"rescore_{stage}_backward", bool(torch.isfinite(logp).all()) and 0 < norm < math.inf,
                     log_prob=float(logp.detach().float().mean()), grad_norm=norm)
        rescore[stage] = res
        del logp, loss, grads
    out["rescore"] = rescore
    out["rescore_peak_gib"] = max((r["peak_gib"] for r in rescore.values()), default=0.0)
    limit = args.max_peak_gib
    if limit is None and cuda and not args.tiny:  # what a rollout GPU leaves the SR model beside vLLM (gpu-path §1h)
        total = torch.cuda.get_device_properties(device).total_memory / GIB
        limit = total * (1 - cluster.rollout.vllm.gpu_memory_utilization) - 1.5  # CUDA contexts + NCCL
        out["rollout_gpu_budget_gib"] = limit
    if limit is not None:
        checks.close("sample_peak_within_rollout_budget", out["sample_peak_gib"], limit)
    out["seconds"] = t
    return out


# ============================================================================================ d. nccl-group
def nccl_group(args, checks: Checks) -> dict[str, Any]:
    import torch

    from core import weight_broadcast as wb

    device = resolve_device(args.device)
    backend = args.backend or ("nccl" if device.type == "cuda" else "gloo")
    world = args.world_size or (1 if backend == "nccl" else 2)
    if backend == "nccl" and world > 1:
        raise ProbeError("nccl at world size > 1 needs one GPU per member (NCCL refuses two ranks on one device)")
    dev = device if backend == "nccl" else torch.device("cpu")
    memory = Memory(dev)
    mb = args.payload_mb or (1 if args.tiny else 1024)
    bucket = (args.bucket_mb or (1 if args.tiny else 512)) << 20
    gen = torch.Generator().manual_seed(args.seed)
    # a model-like state: a few large bf16 matrices, small vectors, an int buffer (every wire dtype path)
    n = max(1, (mb << 20) // (4 * 2 * 4096))
    state = {f"layers.{i}.weight": torch.randn(n, 4096, generator=gen).to(torch.bfloat16) for i in range(4)}
    state.update({"norm.weight": torch.randn(4096, generator=gen), "position_ids": torch.arange(77)})
    state = {k: v.to(dev) for k, v in state.items()}
    sent = {k: v.clone() for k, v in state.items()}
    out: dict[str, Any] = {"backend": backend, "world_size": world, "payload_mb": nbytes(state.values()) / 2**20,
                           "bucket_mb": bucket >> 20}
    port = free_port()
    received: dict[str, Any] = {}
    errors: list[str] = []

    def receiver(rank: int) -> None:
        try:
            group = wb.open_group("127.0.0.1", port, rank, world, backend, timeout_s=args.timeout_s)
            received[rank] = {k: v.clone() for k, v in wb.receive_weights(group, "cpu")}
        except Exception as exc:  # noqa: BLE001 (reported in the JSON line)
            errors.append(f"rank {rank}: {exc!r}")

    threads = [threading.Thread(target=receiver, args=(r,), daemon=True) for r in range(1, world)]
    for th in threads:
        th.start()
    t: dict[str, float] = {}
    with timed(t, "open_s", memory):
        group = wb.open_group("127.0.0.1", port, 0, world, backend, timeout_s=args.timeout_s)
    checks.check("group_opened", group is not None, backend=backend, world_size=world)
    memory.sync()
    start = time.perf_counter()
    stats = wb.broadcast_weights(group, state.items(), bucket, device=dev)
    t["broadcast_returned_s"] = time.perf_counter() - start  # what *_broadcast_s reports: NCCL only enqueued
    memory.sync()
    t["broadcast_synced_s"] = time.perf_counter() - start  # the transfer itself
    for th in threads:
        th.join(args.timeout_s)
    out.update(buckets=stats.num_buckets, bytes=stats.num_bytes, stats_seconds=stats.seconds,
               gbytes_per_s=stats.num_bytes / max(t["broadcast_synced_s"], 1e-9) / 1e9)
    atol = args.atol if args.atol is not None else 0.0
    root = compare_states(sent, {k: v for k, v in state.items()}, 0, atol)
    checks.check("root_tensors_unchanged", root["excess"] <= 0, max_abs_diff=root["max_abs_diff"], atol=atol)
    if world > 1:
        checks.check("receivers_joined", not errors and len(received) == world - 1, errors=errors)
        for rank, got in received.items():
            cmp = compare_states({k: v.cpu() for k, v in sent.items()}, got, 0, atol)
            checks.check(f"rank_{rank}_received_what_was_sent", cmp["excess"] <= 0 and not cmp["only_in_first"]
                         and not cmp["only_in_second"], max_abs_diff=cmp["max_abs_diff"], atol=atol,
                         tensors=len(got), dtypes=sorted({str(v.dtype)[6:] for v in got.values()}))
        out["round_trip"] = "root broadcast, receivers rebuilt every tensor"
    else:
        out["round_trip"] = ("world size 1: no receiver (NCCL refuses a second rank on the same GPU); checked that the "
                             "group opens, the root's bucketed broadcast runs and leaves its tensors unchanged; the "
                             "times are the root's packing and enqueue (returned) and with the device synchronised")
    out["seconds"] = t
    return out


# ============================================================================================ entry point
PROBES: dict[str, tuple[Callable, str]] = {
    "zero3-lora": (zero3_lora, "ZeRO-3 vs ZeRO-2 with LoRA at world size 1: merged weights, export, checkpoint"),
    "learner-7b-memory": (learner_7b_memory, "Qwen2.5-VL-7B-shaped learner micro-batch: peak memory, seconds"),
    "sr-cluster-batch": (sr_cluster_batch, "SD-x4-upscaler-shaped SR sampling at the cluster batch + re-scoring"),
    "nccl-group": (nccl_group, "the weight-sync group: open, bucketed broadcast, round trip where possible"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/gpu_probes.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="probe", required=True, metavar="PROBE")
    for name, (_, help_) in PROBES.items():
        s = sub.add_parser(name, help=help_)
        s.add_argument("--tiny", action="store_true", help="toy sizes: seconds on a CPU")
        s.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--workdir", default=None, help="where temporary models and exports go (default: $TMPDIR)")
        s.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                       help="default: bfloat16 on a GPU, float32 on the CPU")
        if name == "zero3-lora":
            s.add_argument("--recipe", default=RECIPE_CONFIG, help="the LoRA config the learners train")
            s.add_argument("--steps", type=int, default=None, help="GRPO steps per learner (default 2; tiny: 1)")
            s.add_argument("--prompts", type=int, default=None,
                           help="prompts sampled, x the recipe's group size (default 2; tiny: 1)")
            s.add_argument("--rtol", type=float, default=None,
                           help=f"ZeRO-3 vs ZeRO-2, each element: rtol |w| (bf16: {BF16_RTOL:.4f}) ...")
            s.add_argument("--atol-frac", type=float, default=None,
                           help="... + this x the largest training change (bf16: 0.5)")
            s.add_argument("--delta-rtol", type=float, default=None,
                           help="ZeRO-3 vs ZeRO-2: the changes' difference / the change, in norm (bf16: 0.1)")
            s.add_argument("--metric-rtol", type=float, default=None, help="losses / grad norms (bf16: 0.05)")
        else:
            s.add_argument("--config", default=CLUSTER_CONFIG, help="the cluster config whose sizes are used")
        if name in ("learner-7b-memory", "sr-cluster-batch"):
            s.add_argument("--micro-batch", type=int, default=None, help="default: learner.micro_batch_size")
            s.add_argument("--max-peak-gib", type=float, default=None, help="fail above this peak")
        if name == "learner-7b-memory":
            s.add_argument("--turn-tokens", type=int, default=None, help="default: chain.max_stage_tokens")
            s.add_argument("--variants", default="full,lora", help="full (the cluster's: no policy.lora) and/or lora")
            s.add_argument("--lora-config", default=RECIPE_CONFIG, help="whose policy.lora the lora variant uses "
                           "when the cluster config has none")
            s.add_argument("--skip-gather", action="store_true", help="do not time the sync gather")
        if name == "sr-cluster-batch":
            s.add_argument("--prompts", type=int, default=None, help="per actor (default: prompts_per_step / actors)")
            s.add_argument("--group", type=int, default=None, help="default: grpo.group_size")
            s.add_argument("--steps", type=int, default=None, help="default: diffusion.num_steps")
            s.add_argument("--lr-size", type=int, default=None, help="default: data.hr_size / data.scale")
        if name == "nccl-group":
            s.add_argument("--backend", default=None, choices=("nccl", "gloo"), help="default: nccl on a GPU")
            s.add_argument("--world-size", type=int, default=None, help="default: 1 with nccl, 2 with gloo")
            s.add_argument("--payload-mb", type=int, default=None, help="default: 1024 (tiny: 1)")
            s.add_argument("--bucket-mb", type=int, default=None, help="default: 512, the cluster's (tiny: 1)")
            s.add_argument("--atol", type=float, default=None, help="round-trip tolerance (default 0: exact)")
            s.add_argument("--timeout-s", type=float, default=60.0)
    return p


def run_probe(argv: list[str] | None = None) -> tuple[int, dict[str, Any]]:
    """Parse ``argv`` and run the probe: (exit status, the JSON line as a dict). In-process callers (tests) use this;
    ``main`` prints the line."""
    args = parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    checks = Checks()
    start = time.perf_counter()
    line: dict[str, Any] = {"probe": args.probe, "tiny": bool(args.tiny)}
    status = 0
    try:
        device = resolve_device(args.device)
        line.update(device_info(device))
        line["result"] = PROBES[args.probe][0](args, checks)
    except Exception as exc:  # noqa: BLE001 (the JSON line carries it)
        traceback.print_exc(file=sys.stderr)
        line["error"] = f"{type(exc).__name__}: {exc}"
        frames = traceback.extract_tb(exc.__traceback__)
        line["where"] = [f"{Path(f.filename).name}:{f.lineno}" for f in frames[-3:]]
        status = 3
    line["checks"] = checks.results
    line["failures"] = checks.failures
    if status == 0 and checks.failures:
        status = 1
    line.update(ok=status == 0, exit=status, wall_s=time.perf_counter() - start, peak_rss_gib=peak_rss_gib())
    return status, _jsonable(line)


def main(argv: list[str] | None = None) -> int:
    parser().parse_args(argv)  # bad arguments: argparse's message and exit 2, before stdout is taken
    with json_stdout() as emit:
        status, line = run_probe(argv)
        emit(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
