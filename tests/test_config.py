"""Configs: the shipped ones validate; unknown keys, wrong types and impossible values are errors naming key and value."""

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from core import grpo
from core.config import ConfigError, ExperimentConfig, ExperimentalConfig, load_config, to_yaml

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))
RECIPES = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))  # research recipes, not product configs


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert "${" not in to_yaml(cfg)  # every interpolation resolved


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_research_recipes_validate(path):
    assert isinstance(load_config(path), ExperimentConfig)


def test_product_configs_set_no_experimental_key():
    """The research controls are fenced off: only a recipe under configs/experiments/ sets one."""
    for path in SHIPPED:
        assert "experimental" not in OmegaConf.load(path), path.name
        assert load_config(path).experimental == ExperimentalConfig(), path.name
    assert RECIPES and any(load_config(p).experimental != ExperimentalConfig() for p in RECIPES)


def test_local_and_cluster_configs_exist():
    names = {p.name for p in SHIPPED}
    assert {"grpo_local.yaml", "grpo_random_local.yaml", "grpo_8node.yaml"} <= names


def test_interpolation_and_override():
    cfg = load_config(ROOT / "configs/grpo_random_local.yaml", ["name=exp1", "grpo.group_size=8"])
    assert cfg.output_dir == "runs/exp1"
    assert cfg.trainer.log_dir == "runs/exp1/tensorboard"
    assert cfg.grpo.group_size == 8


def test_cluster_config_shape():
    cfg = load_config(ROOT / "configs/grpo_8node.yaml")
    assert cfg.learner.zero_stage == 3 and cfg.learner.backend == "nccl" and cfg.learner.dtype == "bfloat16"
    assert [m.name for m in cfg.reward.metrics] == ["topiq_nr", "musiq", "maniqa-pipal", "clipiqa"]
    assert cfg.policy.bootstrap is False and cfg.policy.path.startswith("/")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("grpo.gruop_size=4", "unknown key 'grpo.gruop_size'"),
        ("nonsense=1", "unknown key 'nonsense'"),
        ("learner.zero_stage=x", "learner.zero_stage"),
        ("trainer.total_steps=1.5", "trainer.total_steps"),
    ],
)
def test_unknown_key_or_wrong_type(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/grpo_random_local.yaml", [override])
    assert fragment in str(err.value)
    assert "grpo_random_local.yaml" in str(err.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("grpo.group_size=1", "grpo.group_size"),
        ("grpo.image_clip_range=0", "grpo.image_clip_range"),
        ("grpo.image_kl_beta=-1", "grpo.image_kl_beta"),
        ("grpo.tis_cap=0.5", "grpo.tis_cap"),
        ("trainer.max_staleness=-1", "trainer.max_staleness"),
        ("trainer.resume=maybe", "trainer.resume"),
        ("trainer.resume=1", "trainer.resume"),
        ("trainer.max_failures=-1", "trainer.max_failures"),
        ("trainer.max_skipped_steps=-1", "trainer.max_skipped_steps"),
        ("rollout.call_timeout_s=-5", "rollout.call_timeout_s"),
        ("reward.call_timeout_s=-5", "reward.call_timeout_s"),
        ("learner.sync_backend=nccl", "learner.sync_backend"),
        ("learner.sync_timeout_s=0", "learner.sync_timeout_s"),
        ("learner.num_ranks=3", "learner.num_ranks"),  # 2 prompts x 4 samples not divisible by 3
        ("learner.micro_batch_size=3", "learner.micro_batch_size"),
        ("learner.zero_stage=4", "learner.zero_stage"),
        ("diffusion.eta=0", "diffusion.eta"),
        ("rollout.engine=sglang", "rollout.engine"),
        ("data.hr_size=66", "data.hr_size"),
        ("reward.understanding_stages=[coarse]", "reward.understanding_stages"),
        ("policy.tiny.num_heads=8", "policy.tiny.num_heads"),  # head size 16 < 32
        ("chain.final_scale=2", "chain.final_scale"),
        ("grpo.image_rewards=[sharpness]", "grpo.image_rewards"),
        ("learner.policy_optim.name=lion", "learner.policy_optim.name"),
        ("learner.diffusion_optim.momentum=1.0", "learner.diffusion_optim.momentum"),
        ("grpo.token_credit.name=word", "grpo.token_credit"),
        ("grpo.advantage_transforms=[{name: placebo_shuffle, factor: 1.5}]", "grpo.advantage_transforms[0]"),
        ("grpo.advantage_transforms=[{name: flip}]", "grpo.advantage_transforms[0]"),
        ("diffusion.train_steps_fraction=0", "diffusion.train_steps_fraction"),
        ("trainer.eval_every=-1", "trainer.eval_every"),
        ("policy.trainable=[norm(]", "policy.trainable"),
        ("grpo.image_group_size=0", "grpo.image_group_size"),
        ("diffusion.train_steps_start=0.9", "diffusion.train_steps_start"),  # 0.9 + fraction 0.25 > 1
    ],
)
def test_impossible_values_name_key_and_value(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/grpo_random_local.yaml", [override])
    message = str(err.value)
    assert f"key {key!r}" in message
    value = override.split("=", 1)[1].strip("[]{}")
    assert value.split(": ")[-1].split(",")[0].strip("}") in message


@pytest.mark.parametrize(
    "override, key, named",
    [
        ("grpo.section_rewards={rough_image: [generation]}", "grpo.section_rewards", "'rough_image'"),
        ("grpo.section_rewards={degradation: [sharpness]}", "grpo.section_rewards.degradation", "'sharpness'"),
        ("grpo.section_rewards={final_understand: [format/rough_image]}", "grpo.section_rewards.final_understand",
         "'format/rough_image'"),
    ],
)
def test_bad_section_rewards_name_the_section_or_the_reward(override, key, named):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/grpo_random_local.yaml", [override, "grpo.token_credit.name=section"])
    assert f"key {key!r}" in str(err.value) and f"{named} is not one of" in str(err.value)


def test_section_rewards_accept_a_sections_own_format():
    cfg = load_config(ROOT / "configs/grpo_random_local.yaml",
                      ["grpo.section_rewards={final_understand: [format/final_understand, understanding]}",
                       "grpo.token_credit.name=section"])
    assert cfg.grpo.section_rewards == {"final_understand": ["format/final_understand", "understanding"]}


def test_section_rewards_and_section_credit_go_together():
    """A key that nothing would read is an error: section rewards without section credit, and the reverse."""
    with pytest.raises(ConfigError, match="section rewards go with grpo.token_credit"):
        load_config(ROOT / "configs/grpo_random_local.yaml", ["grpo.section_rewards={degradation: [degradation]}"])
    with pytest.raises(ConfigError, match="key 'grpo.section_rewards' = None"):
        load_config(ROOT / "configs/grpo_random_local.yaml", ["grpo.token_credit.name=section"])


def test_the_held_out_evaluation_runs_in_grpo_mode_only():
    with pytest.raises(ConfigError, match="key 'trainer.eval_every' = 5: the periodic held-out evaluation runs in grpo"):
        load_config(ROOT / "configs/sft_local.yaml", ["trainer.eval_every=5"])
    assert load_config(ROOT / "configs/grpo_random_local.yaml", ["trainer.eval_every=5"]).trainer.eval_every == 5


def test_removed_keys_are_unknown_keys():
    for key in ("sft.epochs=2", "grpo.negative_advantage_scale=0.5", "grpo.shuffle_advantages=true",
                "grpo.stray_tag_penalty=1.0", "grpo.image_kl_target=0.001", "grpo.sft_coef=0.5",
                "grpo.text_loss_weight=1.0", "grpo.image_loss_weight=1.0", "grpo.detail_gain_std=0.3",
                "diffusion.train_stages=[final]", "policy.freeze_vision=true", "chain.sr_reads_degradation=true"):
        with pytest.raises(ConfigError, match="unknown key"):
            load_config(ROOT / "configs/grpo_random_local.yaml", [key])
    # options of a registered rule that were removed are unknown options of it
    for key, rule in (("grpo.token_credit={name: chain, stray_tag_penalty: 1.0}", "grpo.token_credit"),
                      ("grpo.advantage_transforms=[{name: scale_negative, factor: 0.1}]",
                       "grpo.advantage_transforms[0]"),
                      ("grpo.image_objective={name: nft, target: projected}", "grpo.image_objective")):
        with pytest.raises(ConfigError, match=f"key '{re.escape(rule)}'.*(unknown option|is not one of)"):
            load_config(ROOT / "configs/grpo_random_local.yaml", [key])


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(ROOT / "configs/grpo_random_local.yaml", ["grpo.group_size"])


def test_missing_required_path(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\n")
    with pytest.raises(ConfigError, match="policy.path"):
        load_config(cfg)


def test_a_panel_needs_the_held_out_evaluation_and_metrics_that_are_not_rewards():
    with pytest.raises(ConfigError, match="trainer.eval_panel.*needs trainer.eval_every"):
        load_config(ROOT / "configs/grpo_random_local.yaml", ["trainer.eval_panel.full_reference=[{name: gmsd}]"])

    with pytest.raises(ConfigError, match="trainer.eval_panel.*training rewards"):
        load_config(ROOT / "configs/grpo_random_local.yaml", ["trainer.eval_every=5",
                                                       "trainer.eval_panel.full_reference=[{name: psnr}]"])


def test_cold_start_must_be_an_sft_config_whose_export_the_run_starts_from(tmp_path):
    from core.config import cold_start_config, cold_start_pending

    export = "runs/sft_local/checkpoints/step_000300/export"
    ok = ["cold_start=configs/sft_local.yaml", f"policy.init_from={export}/policy",
          f"diffusion.init_from={export}/diffusion"]
    cfg = load_config(ROOT / "configs/grpo_random_local.yaml", ok)
    assert cold_start_config(cfg).name == "sft_local"
    moved = [f"output_dir={tmp_path}/grpo", *ok[:1], f"policy.init_from={tmp_path}/sft/checkpoints/step_000300"
             "/export/policy"]
    with pytest.raises(ConfigError, match="key 'policy.init_from'.*the cold start .* exports runs/sft_local"):
        load_config(ROOT / "configs/grpo_random_local.yaml", moved)
    with pytest.raises(ConfigError, match="key 'cold_start'.*must be an sft config"):
        load_config(ROOT / "configs/grpo_random_local.yaml", ["cold_start=configs/grpo_random_local.yaml", *ok[1:]])
    with pytest.raises(ConfigError, match="key 'cold_start'.*set policy.init_from"):
        load_config(ROOT / "configs/grpo_random_local.yaml", ["cold_start=configs/sft_local.yaml"])
    with pytest.raises(ConfigError, match="key 'cold_start'.*config file not found: configs/nope.yaml"):
        load_config(ROOT / "configs/grpo_random_local.yaml", ["cold_start=configs/nope.yaml", *ok[1:]])
    # pending while an export is missing; a run without a cold start never is
    sft = tmp_path / "sft"
    here = [f"cold_start={tmp_path}/sft.yaml", f"policy.init_from={sft}/checkpoints/step_000002/export/policy"]
    (tmp_path / "sft.yaml").write_text((ROOT / "configs/sft_local.yaml").read_text().replace(
        "output_dir: runs/${name}", f"output_dir: {sft}").replace("total_steps: 300", "total_steps: 2"))
    cfg = load_config(ROOT / "configs/grpo_random_local.yaml", here)
    assert cold_start_pending(cfg)
    (sft / "checkpoints/step_000002/export/policy").mkdir(parents=True)
    assert not cold_start_pending(cfg)
    assert not cold_start_pending(load_config(ROOT / "configs/grpo_random_local.yaml"))


@pytest.mark.parametrize("overrides, why", [
    (["grpo.image_group_size=4", "diffusion.freeze=true", "grpo.image_kl_beta=0"], "the SR model is frozen"),
    (["grpo.image_group_size=4", "reward.metrics=[]", "reward.full_reference=[]"], "no generation metric"),
])
def test_image_branches_need_a_trained_sr_model_and_a_metric(overrides, why):
    with pytest.raises(ConfigError, match=f"grpo.image_group_size' = 4: {why}"):
        load_config(ROOT / "configs/grpo_random_local.yaml", overrides)


def test_an_override_of_a_rule_replaces_it_whole():
    """grpo.image_objective / grpo.token_credit name one rule with its options: overriding the name drops the old
    rule's options instead of merging them into the new one."""
    cfg = load_config(ROOT / "configs/grpo_local.yaml", ["grpo.image_objective={name: trajectory}"])
    assert cfg.grpo.image_objective == {"name": "trajectory"}
    cfg = load_config(ROOT / "configs/grpo_local.yaml", ["grpo.image_objective={name: nft, beta: 0.5}"])
    assert cfg.grpo.image_objective == {"name": "nft", "beta": 0.5}
    with pytest.raises(ConfigError, match="unknown option"):
        load_config(ROOT / "configs/grpo_local.yaml", ["grpo.image_objective={name: trajectory, beta: 0.5}"])


def test_an_override_of_a_mapping_replaces_it_while_a_section_merges():
    """``key={...}`` on a dict-typed key sets it to exactly that (``lr_scale={}`` clears it); on a section of
    fields (``reward.weights``) it changes the named fields only; a dotted key changes one entry."""
    cfg = load_config(ROOT / "configs/grpo_local.yaml",
                      ["learner.policy_optim.lr_scale={}", "policy.lora.modules_to_save=[]",
                       "grpo.section_rewards={degradation: [degradation]}", "reward.weights={format: 2.0}"])
    assert cfg.learner.policy_optim.lr_scale == {}
    assert cfg.grpo.section_rewards == {"degradation": ["degradation"]}
    assert (cfg.reward.weights.format, cfg.reward.weights.generation) == (2.0, 1.0)
    cfg = load_config(ROOT / "configs/grpo_local.yaml", ["grpo.section_rewards.degradation=[degradation]"])
    assert cfg.grpo.section_rewards["degradation"] == ["degradation"] and len(cfg.grpo.section_rewards) == 4
    with pytest.raises(ConfigError, match="key 'learner.policy_optim.lr_scale.a'"):
        load_config(ROOT / "configs/grpo_local.yaml", ["learner.policy_optim.lr_scale={a: fast}"])


STAGE_CREDIT = ["grpo.image_credit={name: stage}", "grpo.image_group_size=2",
                "reward.stage_metrics=[{name: psnr, weight: 1.0, scale: 40.0}]"]


def test_stage_credit_gives_the_rough_and_middle_steps_their_own_images_advantages():
    from core.records import Scores
    from rl.advantages import step_advantages

    cfg = load_config(ROOT / "configs/grpo_local.yaml", STAGE_CREDIT)
    branch = lambda k, b: {"generation": 0.5, "quality/piqe": 0.5, "quality/psnr": 0.5, "quality/ssim": 0.5,  # noqa: E731
                           "generation/rough": 0.1 * k * (b + 1), "generation/middle": 0.2}
    scores = [Scores(prompt_id=0, sample_index=k, parts={"format": 1.0}, total=0.0,
                     branches=(branch(k, 0), branch(k, 1))) for k in range(4)]
    adv = step_advantages(cfg, scores, seed=0)
    rough = torch.tensor([[0.1 * k * (b + 1) for b in range(2)] for k in range(4)])
    # the stage's values centred on each chain's branches, scaled by the group's spread (the branches' estimator)
    torch.testing.assert_close(adv.stages[:, 0], grpo.branch_advantages(rough, 4)[0])
    assert adv.stages[:, 1].abs().max() == 0  # the middle images tie
    assert adv.image_branches.abs().max() == 0  # and so do the final ones: only the rough steps learn here
    assert step_advantages(load_config(ROOT / "configs/grpo_local.yaml", STAGE_CREDIT[1:]), scores, seed=0).stages is None
    for overrides, key, why in (
            (STAGE_CREDIT[:2], "grpo.image_credit", "reward.stage_metrics, and there are none"),
            (["grpo.image_credit={name: stage, weight: 1}"], "grpo.image_credit", "unknown option"),
            (STAGE_CREDIT[:1] + ["reward.stage_metrics=[{name: psnr, scale: 0.0}]"], "reward.stage_metrics\\[0\\].scale",
             "must be > 0")):
        with pytest.raises(ConfigError, match=f"key '{key}' = .*{why}"):
            load_config(ROOT / "configs/grpo_local.yaml", overrides)


def test_degradation_item_credit_is_a_section_credit_option_that_needs_the_degradation_reward():
    from core.records import Scores
    from rl.advantages import step_advantages

    cfg = load_config(ROOT / "configs/grpo_local.yaml", ["grpo.token_credit.degradation_items=true"])
    parts = [{"format": 1.0, "degradation": 0.2 * k, **{f"degradation/{i}": float(j < k) for j, i in
              enumerate(("blur", "downsample", "noise", "compression", "upsample"))}} for k in (1, 2, 3, 4)]
    scores = [Scores(prompt_id=0, sample_index=k, parts=p, total=0.0) for k, p in enumerate(parts)]
    adv = step_advantages(cfg, scores, seed=0)  # one group of 4: blur right everywhere, flat -> 0
    assert adv.items.shape == (4, 5) and adv.items[:, 0].abs().max() == 0 and adv.items[:, 1].std() > 0
    assert step_advantages(load_config(ROOT / "configs/grpo_local.yaml"), scores, seed=0).items is None
    for override, why in (("grpo.token_credit.degradation_items=maybe", "must be true or false"),
                          ("reward.weights.degradation=0", "reward.weights.degradation is 0.0")):
        with pytest.raises(ConfigError, match=f"key 'grpo.token_credit.degradation_items' = .*{why}"):
            load_config(ROOT / "configs/grpo_local.yaml", ["grpo.token_credit.degradation_items=true", override]
                        if "weights" in override else [override])


@pytest.mark.parametrize("overrides, why", [
    (["experimental.detail_gain_std=-0.1"], "must be >= 0"),
    (["experimental.detail_gain_std=0.3"], "the trajectory objective re-scores the sampled steps"),
])
def test_detail_gains_need_the_nft_objective(overrides, why):
    with pytest.raises(ConfigError, match=f"key 'experimental.detail_gain_std' = .*{why}"):
        load_config(ROOT / "configs/grpo_random_local.yaml", overrides)
    cfg = load_config(ROOT / "configs/grpo_random_local.yaml", ["experimental.detail_gain_std=0.3",
                                                               "grpo.image_objective={name: nft}"])
    assert cfg.experimental.detail_gain_std == 0.3
