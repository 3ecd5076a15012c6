"""The GPU check's scripts on the CPU: every probe of scripts/gpu_probes.py at ``--tiny --device cpu`` (the code paths
a GPU runs, at toy sizes), a probe whose check fails exiting non-zero with its one JSON line, scripts/gpu_check.sh's
syntax, and scripts/gpu_node_check.py's plan (``--dry-run``). The probes run in this process (``run_probe``: the
imports are paid once); the command lines run as the GPU machine runs them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


probes = _script("gpu_probes")
node_check = _script("gpu_node_check")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _tiny(probe: str, tmp_path: Path, *flags: str) -> dict:
    status, line = probes.run_probe([probe, "--tiny", "--device", "cpu", "--workdir", str(tmp_path), *flags])
    assert json.loads(json.dumps(line)) == line  # what main prints
    assert status == 0 and line["ok"], (line.get("error"), line["failures"])
    assert line["probe"] == probe and line["device"] == "cpu" and line["tiny"]
    assert line["checks"] and all(c["ok"] for c in line["checks"].values())
    return line["result"]


# ============================================================================================ the probes
def test_nccl_group_round_trips_over_gloo_on_the_cpu(tmp_path):
    r = _tiny("nccl-group", tmp_path)
    assert r["backend"] == "gloo" and r["world_size"] == 2  # a receiver thread: a real round trip
    assert r["buckets"] >= 2 and r["bytes"] == round(r["payload_mb"] * 2**20)  # 1 MiB buckets: split
    assert {"open_s", "broadcast_returned_s", "broadcast_synced_s"} <= set(r["seconds"])


def test_a_failed_check_exits_non_zero_with_its_one_json_line(tmp_path):
    """The command line as gpu_check.sh runs it: a tolerance no round trip can meet (--atol -1) fails the checks that
    compare tensors; stdout holds the JSON line alone."""
    run = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_probes.py"), "nccl-group", "--tiny", "--device",
                          "cpu", "--atol", "-1"], capture_output=True, text=True, env=_env(), timeout=120,
                         check=False)
    assert run.returncode == 1, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert not line["ok"] and line["exit"] == 1
    assert set(line["failures"]) == {"root_tensors_unchanged", "rank_1_received_what_was_sent"}
    assert line["checks"]["group_opened"]["ok"] and line["checks"]["receivers_joined"]["ok"]


def test_bad_arguments_and_a_crash_have_their_own_exit_codes(tmp_path):
    with pytest.raises(SystemExit) as exc:
        probes.main(["zero3-lora", "--device", "tpu"])
    assert exc.value.code == 2
    # a probe that cannot run as asked: exit 3, and its line says why and where
    status, line = probes.run_probe(["nccl-group", "--tiny", "--device", "cpu", "--backend", "nccl",
                                     "--world-size", "2"])
    assert status == 3 and not line["ok"] and "NCCL refuses two ranks on one device" in line["error"]
    assert line["where"] and line["checks"] == {}


def test_compare_trained_tells_rounding_from_a_lost_update():
    import torch

    before = {"w": torch.zeros(4)}
    ref = {"w": torch.tensor([1e-3, -1e-3, 1e-3, 1e-3])}
    flipped = {"w": torch.tensor([1e-3, -1e-3, 1e-3, -1e-3])}  # one near-zero gradient rounded to the other sign
    ok = probes.compare_trained(before, ref, {"w": ref["w"] * (1 + 1e-3)}, rtol=1 / 64, atol_frac=0.5)
    assert ok["excess"] <= 0 and ok["rel_delta_norm"] == pytest.approx(1e-3, rel=1e-3)
    assert probes.compare_trained(before, ref, flipped, 1 / 64, 0.5)["rel_delta_norm"] == pytest.approx(1.0)
    lost = probes.compare_trained(before, ref, before, 1 / 64, 0.5)  # ZeRO-3 never applied the step
    assert lost["rel_delta_norm"] == pytest.approx(1.0) and lost["excess"] > 0


def test_compare_states_measures_against_the_tolerance():
    import torch

    a = {"w": torch.tensor([1.0, -2.0, 4.0]), "only_a": torch.zeros(1)}
    b = {"w": torch.tensor([1.0, -2.01, 4.0])}
    near = probes.compare_states(a, b, rtol=1 / 64, atol=0.0)  # 0.01 <= 2 / 64
    assert near["excess"] <= 0 and near["worst"] == "w" and near["elements_differing"] == 1
    assert near["only_in_first"] == ["only_a"]
    assert probes.compare_states(a, b, rtol=1e-3, atol=0.0)["excess"] > 0
    assert probes.compare_states(a, {"w": torch.zeros(2)}, 0, 0)["excess"] == float("inf")  # a shape change


@pytest.mark.slow
def test_zero3_lora_matches_zero2_exports_and_restores(tmp_path):
    r = _tiny("zero3-lora", tmp_path)
    assert r["dtype"] == "float32" and r["chains"] == 2 and r["image_branches"] == 2
    for model in ("policy", "diffusion"):
        for what in ("merged", "adapters"):  # float32 here: the two learners agree to float rounding
            cmp = r[f"{model}_{what}_zero3_vs_zero2"]
            assert cmp["elements"] > 0 and not cmp["only_in_first"] and not cmp["only_in_second"]
            assert cmp["max_training_change"] > 0 and cmp["rel_delta_norm"] < 1e-4
    assert r["zero3_info"]["zero_stage"] == 3 and r["zero3_info"]["lora_layers"]["policy"] > 0
    assert r["export"] == ["diffusion", "diffusion_adapter", "policy", "policy_adapter"]
    assert len(r["seconds"]["learner_build_s"]) == 3  # ZeRO-2, ZeRO-3, the ZeRO-3 restored from its checkpoint


def test_learner_7b_memory_runs_the_cluster_layout_at_toy_sizes(tmp_path):
    r = _tiny("learner-7b-memory", tmp_path, "--turn-tokens", "6")
    assert r["micro_batch"] == 2 and r["gradient_checkpointing"]  # grpo_8node's
    assert r["image_sizes"] == [[32, 32], [32, 32], [64, 64]]  # LR, rough (x1), middle (x2); the final is not read
    assert len(r["tokens_per_chain"]) == 2 and all(n > 3 * 6 for n in r["tokens_per_chain"])
    full, adapted = r["full"], r["lora"]
    assert full["trainable_parameters"] == r["parameters"]  # grpo_8node trains the whole policy
    assert 0 < adapted["trainable_parameters"] < full["trainable_parameters"] / 5
    assert r["lora_config"]["source"] == "configs/grpo_1gpu.yaml"  # grpo_8node has no policy.lora
    assert r["lora_config"]["layers"] == 2 * 7  # q k v o gate up down of each language-model layer
    for res in (full, adapted):
        assert res["peak_gib"] > 0 and res["fwd_bwd_s_1"] > 0 and res["full_state_gib"] > 0
    assert adapted["adapters_gib"] < adapted["full_state_gib"] / 5 and adapted["merged_gib"] > 0


def test_sr_cluster_batch_samples_three_stages_and_rescores_each(tmp_path):
    r = _tiny("sr-cluster-batch", tmp_path)
    assert r["images_per_stage"] == 4 and r["num_steps"] == 2
    assert r["stage_sizes"] == {"rough": [16, 16], "middle": [32, 32], "final": [64, 64]}
    assert [r["sample"][s]["latent"] for s in ("rough", "middle", "final")] == [[4, 4], [8, 8], [16, 16]]  # VAE x4
    assert set(r["rescore"]) == {"rough", "middle", "final"} and r["rescore_traces"] == 2
    assert all(x["grads_gib"] > 0 for x in r["rescore"].values())
    assert set(r["parameters"]) == {"unet", "vae", "text_encoder"}


def test_the_7b_and_upscaler_shapes_are_the_published_ones():
    """The full-size configs the GPU builds (not built here: 8.3B parameters); their numbers as published."""
    from transformers import Qwen2_5_VLConfig

    cfg = probes.qwen_7b_config(probes.chain_tokenizer(1024), tiny=False)
    assert isinstance(cfg, Qwen2_5_VLConfig)
    text, vision = cfg.text_config, cfg.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (3584, 28, 28, 4, 18944, 152064)
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.out_hidden_size) \
        == (32, 1280, 3420, 3584)
    assert probes.SD_X4_UNET["block_out_channels"] == (256, 512, 512, 1024)
    assert probes.SD_X4_UNET["in_channels"] == 7 and probes.SD_X4_VAE["latent_channels"] == 4


# ============================================================================================ the shell script
def test_gpu_check_sh_parses_and_names_every_probe():
    subprocess.run(["bash", "-n", str(ROOT / "scripts/gpu_check.sh")], check=True)
    text = (ROOT / "scripts/gpu_check.sh").read_text()
    for name in probes.PROBES:
        assert f"probe {name} " in text, name


# ============================================================================================ the node check
@pytest.fixture
def model_dir(tmp_path) -> Path:
    """What the plan reads of a model directory: its config.json (Qwen2.5-VL-7B's 152,064 embedding rows)."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl",
                                                      "text_config": {"vocab_size": 152_064}}))
    return tmp_path


def test_node_check_dry_run_prints_the_plan(model_dir):
    run = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_node_check.py"), "--model", str(model_dir),
                          "--dry-run", "--gpus", "1"], capture_output=True, text=True, env=_env(), timeout=120,
                         check=False)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert line["ok"] and line["dry_run"] and not line["problems"]
    plan = line["plan"]
    assert plan["embedding_rows"] == 152_064 and plan["gpus"] == 1
    engine = plan["engine"]  # grpo_8node's rollout
    assert engine["in_process"] is False and engine["gpu_memory_utilization"] == 0.55
    assert engine["sampling"]["temperature"] == 0.9 and engine["transfer"] == "safetensors_bytes"
    assert plan["generate"]["turn_1"] == {"n": 8, "max_tokens": 256, "stop": "rough"}
    assert plan["generate"]["lr_image"] == [128, 128]
    update = plan["update"]
    assert update["mode"] == "none" and "NCCL refuses two ranks on one device" in update["skipped"]
    assert line["sampling_limits"] == {"checked": False, "why": f"no tokenizer in {model_dir}"}


def test_node_check_plans_nccl_with_two_gpus_and_refuses_it_with_one(model_dir):
    status, line = node_check.run_check(["--model", str(model_dir), "--dry-run", "--gpus", "2"])
    assert status == 0 and line["plan"]["update"]["mode"] == "nccl" and line["plan"]["engine"]["transfer"] == "nccl"
    assert line["plan"]["update"]["bucket_mb"] == 512 and line["plan"]["update"]["timeout_s"] == 300
    status, line = node_check.run_check(["--model", str(model_dir), "--dry-run", "--update", "nccl", "--gpus", "1"])
    assert status == 2 and not line["ok"]
    assert line["problems"] == ["--update nccl needs 2 GPUs (engine TP 1 + the learner), 1 found"]
    status, line = node_check.run_check(["--model", str(model_dir / "missing"), "--dry-run", "--perturb", "1"])
    assert status == 2 and len(line["problems"]) == 2  # no config.json there; a perturbation that changes nothing
    status, line = node_check.run_check(["--model", str(model_dir), "--dry-run", "rollout.vllm.nope=1"])
    assert status == 2 and line["problems"][0].startswith("config:")


def test_node_check_gap_is_the_mean_absolute_log_prob_difference_over_sampled_tokens():
    import torch

    from actors.text_engine import TextSample

    samples = [TextSample((5, 6), (-1.0, -2.0), "", "length"), TextSample((7,), (-0.5,), "", "stop")]
    learner = torch.tensor([[0.0, 0.0, -1.5, -2.0], [0.0, 0.0, -0.5, 0.0]])  # prompt of 2, then the samples
    g = node_check.gaps(samples, learner, prompt_len=2)
    assert g == {"mean": pytest.approx(0.5 / 3), "max": 0.5, "tokens": 3}
