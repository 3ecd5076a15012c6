"""LoRA adapters (policy.lora, diffusion.lora): the pure merge against peft's own, the adapters-off reference, a
learner step that moves only adapters, and the export (merged model + peft adapter) against base + adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from learner_support import ADVANTAGES, ROOT, one_rank_worker, sample_rollouts
from torch import nn

from core.config import load_config
from core.model_config import LoraConfig
from core.records import ChainAdvantage
from core.validation import ConfigError
from models import lora

POLICY_TARGETS = r"language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj$"
UNET_TARGETS = r"unet\..*(conv1|conv2|to_q|to_k|to_v|to_out\.0)$"


# ============================================================================================ pure parts
class _Toy(nn.Module):
    """A Linear, a 3x3 and a 1x1 Conv2d: every layer kind ``lora.merge_lora`` merges."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.head(self.point(torch.relu(self.conv(x))).flatten(1))


def _adapted_toy(rank: int = 2, alpha: float = 6.0):
    base = _Toy()
    model = copy.deepcopy(base)
    scalings = lora.add_lora(model, LoraConfig(rank=rank, alpha=alpha, target_modules=["conv$", "point", "head"]),
                             "toy.lora")
    with torch.no_grad():  # B = 0 at the start: give the adapters a value so the merge has work to do
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.3)
    return base, model, scalings


def test_adapters_start_at_zero_and_only_they_train():
    base = _Toy()
    model = copy.deepcopy(base)
    scalings = lora.add_lora(model, LoraConfig(rank=2, alpha=6.0, target_modules=["conv$", "head"]), "toy.lora")
    assert scalings == {"conv": 3.0, "head": 3.0}  # alpha / rank, the untargeted 1x1 conv left alone
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(model(x), base(x))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


def test_merge_equals_peft_and_the_merged_base_computes_as_the_adapted_model():
    base, model, scalings = _adapted_toy()
    merged = lora.merge_lora(model.state_dict(), scalings)
    assert set(merged) == set(base.state_dict())  # the base model's names, nothing else
    for name in scalings:  # peft's own delta for each adapted layer
        layer = model.get_submodule(name)
        expected = layer.base_layer.weight + layer.get_delta_weight(lora.ADAPTER)
        assert (merged[f"{name}.weight"] - expected).abs().max() < 1e-6
    fresh = _Toy()
    fresh.load_state_dict(merged, strict=True)
    x = torch.randn(4, 3, 6, 6)
    assert (fresh(x) - model(x)).abs().max() < 1e-5
    assert not torch.allclose(fresh(x), base(x))  # the adapters did change the model


def test_adapters_disabled_computes_exactly_the_base_model():
    base, model, _ = _adapted_toy()
    x = torch.randn(3, 3, 6, 6)
    with lora.adapters_disabled(model):
        assert torch.equal(model(x), base(x))
    assert not torch.equal(model(x), base(x))
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)  # trainable again


def test_saved_adapter_loads_with_peft_onto_the_base(tmp_path):
    from peft import PeftModel

    base, model, scalings = _adapted_toy()
    cfg = LoraConfig(rank=2, alpha=6.0, target_modules=["conv$", "point", "head"])
    lora.save_adapter(tmp_path, model.state_dict(), cfg, scalings, "toy")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    x = torch.randn(2, 3, 6, 6)
    assert (loaded(x) - model(x)).abs().max() < 1e-6


def test_a_target_pattern_that_matches_nothing_is_named():
    with pytest.raises(ValueError, match=r"toy.lora.target_modules: \['nope'\] match no Linear or Conv2d"):
        lora.add_lora(_Toy(), LoraConfig(target_modules=["conv$", "nope"]), "toy.lora")


class _TiedToy(nn.Module):
    """An embedding and an output head sharing one weight, as under ``tie_word_embeddings``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.embed.weight


def test_a_tied_target_is_refused_and_an_untied_one_is_adapted():
    with pytest.raises(ValueError, match=r"toy.lora.target_modules: 'lm_head' shares its weight with \['embed'\]"):
        lora.add_lora(_TiedToy(), LoraConfig(target_modules=["lm_head"]), "toy.lora")
    untied = _TiedToy()
    untied.lm_head.weight = nn.Parameter(untied.embed.weight.detach().clone())
    assert set(lora.add_lora(untied, LoraConfig(target_modules=["lm_head", "proj"]), "toy.lora")) == {"lm_head", "proj"}


class _NormToy(nn.Module):
    """A projection, a norm and a head: the norm is the module trained in full (``modules_to_save``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.proj = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.norm(self.proj(x)))


SAVED_CFG = LoraConfig(rank=2, alpha=4.0, target_modules=["proj"], modules_to_save=["norm$"])


def _saved_toy():
    base = _NormToy()
    model = copy.deepcopy(base)
    scalings = lora.add_lora(model, SAVED_CFG, "toy.lora")
    with torch.no_grad():  # give the adapters and the saved copy values of their own
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return base, model, scalings


def test_a_saved_module_trains_whole_and_the_reference_switches_it_back():
    base, model, scalings = _saved_toy()
    assert scalings == {"proj": 2.0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"proj.lora_A.default.weight", "proj.lora_B.default.weight",
                         "norm.modules_to_save.default.weight", "norm.modules_to_save.default.bias"}
    x = torch.randn(5, 4)
    with lora.adapters_disabled(model):
        assert torch.equal(model(x), base(x))
    assert not torch.allclose(model(x), base(x))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # trainable again after


def test_a_saved_module_is_merged_and_exported_in_peft_format(tmp_path):
    from peft import PeftModel

    base, model, scalings = _saved_toy()
    merged = lora.merge_lora(model.state_dict(), scalings)
    assert set(merged) == set(base.state_dict())
    assert torch.equal(merged["norm.weight"], model.norm.modules_to_save["default"].weight)
    fresh = _NormToy()
    fresh.load_state_dict(merged, strict=True)
    x = torch.randn(5, 4)
    assert (fresh(x) - model(x)).abs().max() < 1e-5
    lora.save_adapter(tmp_path, model.state_dict(), SAVED_CFG, scalings, "toy")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert (loaded(x) - model(x)).abs().max() < 1e-6
    assert lora.adapter_bytes(model.state_dict()) == 4 * (2 * 4 + 6 * 2 + 6 + 6)  # A, B, the norm's gain and bias


@pytest.mark.parametrize("patterns, message", [
    (["nope"], r"toy.lora.modules_to_save: \['nope'\] match no module"),
    (["proj"], r"toy.lora.modules_to_save: \['proj'\] also hold adapters"),
])
def test_bad_modules_to_save_are_named(patterns, message):
    with pytest.raises(ValueError, match=message):
        lora.add_lora(_NormToy(), LoraConfig(target_modules=["proj"], modules_to_save=patterns), "toy.lora")


def test_a_saved_module_whose_name_ends_another_is_refused():
    """peft matches ``modules_to_save`` by the end of a name: saving the top-level ``norm`` would also train
    ``block.layernorm``, so it is an error rather than a silently larger set."""
    model = _NormToy()
    model.block = nn.Sequential()
    model.block.add_module("layernorm", nn.LayerNorm(6))
    with pytest.raises(ValueError, match=r"toy.lora.modules_to_save: peft would also train \['block.layernorm'\]"):
        lora.add_lora(model, LoraConfig(target_modules=["proj"], modules_to_save=["^norm$"]), "toy.lora")


def test_lr_scale_gives_the_matched_parameters_their_own_learning_rate():
    from core.config import OptimConfig
    from learner.engine import make_optimizer

    model = copy.deepcopy(_NormToy())
    lora.add_lora(model, SAVED_CFG, "toy.lora")
    optimizer = make_optimizer(model, OptimConfig(lr=1e-3, lr_scale={r"^norm\.": 20.0}))
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    saved = {id(p) for n, p in model.named_parameters() if ".modules_to_save." in n}
    adapters = {id(p) for n, p in model.named_parameters() if ".lora_" in n}
    assert set(by_lr) == {1e-3, 2e-2}
    assert by_lr[2e-2] == saved and by_lr[1e-3] == adapters
    with pytest.raises(ValueError, match=r"learner.policy_optim.lr_scale: \['head'\] match no trained parameter"):
        make_optimizer(model, OptimConfig(lr_scale={"head": 2.0}), "learner.policy_optim")


@pytest.mark.parametrize("override, key", [
    ("policy.lora.rank=0", "policy.lora.rank"),
    ("diffusion.lora.alpha=0", "diffusion.lora.alpha"),
    ("policy.lora.dropout=1.0", "policy.lora.dropout"),
    ("policy.lora.target_modules=[]", "policy.lora.target_modules"),
    ("policy.lora.modules_to_save=['[']", "policy.lora.modules_to_save"),
    ("learner.policy_optim.lr_scale={norm: 0.0}", "learner.policy_optim.lr_scale"),
    ("learner.diffusion_optim.lr_scale={'(': 2.0}", "learner.diffusion_optim.lr_scale"),
    ("diffusion.lora.target_modules=['(']", "diffusion.lora.target_modules"),
    ("policy.trainable=[norm]", "policy.trainable"),
    ("diffusion.freeze=true", "diffusion.lora"),
])
def test_bad_lora_values_are_config_errors(override, key):
    base = [f"policy.lora={{target_modules: ['{POLICY_TARGETS}']}}", "diffusion.lora={target_modules: [unet]}"]
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        load_config(ROOT / "configs/grpo_random_local.yaml", [*base, override])


# ============================================================================================ in the learner
@pytest.fixture(scope="module")
def chains(small_models):
    return sample_rollouts(small_models["policy"], small_models["diffusion"])


LORA = [f"policy.lora={{rank: 4, alpha: 8, target_modules: ['{POLICY_TARGETS}'], "
        "modules_to_save: ['language_model\\.norm$']}",  # the final norm trained in full beside the adapters
        f"diffusion.lora={{rank: 4, alpha: 8, target_modules: ['{UNET_TARGETS}'], "
        "modules_to_save: ['unet\\.conv_out$']}"]  # and the UNet's output conv (weight and bias)


@pytest.fixture(scope="module")
def stepped(small_models, chains, port):
    """A one-rank learner with adapters on both models (and the policy's final norm and the UNet's output conv
    trained whole) and both KL terms, after one GRPO step."""
    worker = one_rank_worker(small_models, port, *LORA, "grpo.kl_beta=0.1", "grpo.image_kl_beta=0.1",
                             "learner.policy_optim.lr=1e-2", "learner.diffusion_optim.lr=1e-2")
    before = {m: worker.gather_full_state(m) for m in ("policy", "diffusion")}
    raw_before = {m: {n: p.detach().clone() for n, p in worker.engine(m).module.named_parameters()}
                  for m in ("policy", "diffusion")}
    metrics = worker.train_chains([ChainAdvantage(float(a)) for a in ADVANTAGES], False, *chains)
    return worker, before, raw_before, metrics


@pytest.mark.slow
def test_a_step_moves_only_the_adapters_and_the_merged_weights_follow(stepped):
    worker, before, raw_before, metrics = stepped
    assert metrics["text_first_epoch_ratio_mean"] == pytest.approx(1.0, abs=1e-3)  # B = 0: still the base
    assert metrics["image_first_epoch_ratio_mean"] == pytest.approx(1.0, abs=1e-3)
    info = worker.info()
    for model in ("policy", "diffusion"):
        params = dict(worker.engine(model).module.named_parameters())
        changed = {n for n, p in params.items() if not torch.equal(p, raw_before[model][n])}
        assert changed and all(lora.is_trained(n) for n in changed), sorted(changed)[:4]
        assert any(".modules_to_save." in n for n in changed)
        assert info["trainable_parameters"][model] < info["parameters"][model] / 2
        after = worker.gather_full_state(model)
        assert set(after) == set(before[model])  # the base model's names: what the rollout engines load
        moved = {n for n in after if not torch.equal(after[n], before[model][n])}
        # only adapted layers' weights moved, and the saved module whole
        assert moved and all(n.endswith(".weight") or n.startswith("unet.conv_out.") for n in moved), sorted(moved)
        assert model == "policy" or {"unet.conv_out.weight", "unet.conv_out.bias"} <= moved


@pytest.mark.slow
def test_the_adapters_off_reference_gives_exactly_the_base_models_log_probs(stepped, small_models, chains):
    from core.grpo import build_train_batch
    from learner.scoring import policy_log_probs
    from models.policy import load_policy

    worker, *_ = stepped
    assert isinstance(worker.models.policy.reference, lora.BasePolicy)  # no second copy of the policy in memory
    assert isinstance(worker.models.sr.reference, lora.BasePipeline)
    batch = build_train_batch(chains, ADVANTAGES)
    base = load_policy(small_models["policy"], "float32", "cpu")
    with torch.no_grad():
        ref = policy_log_probs(worker.models.policy.reference, worker.models.policy.tokens, batch, chains, worker.ctx.device, 1.0)
        expected = policy_log_probs(base, worker.models.policy.tokens, batch, chains, worker.ctx.device, 1.0)
        trained = policy_log_probs(worker.engine("policy").module, worker.models.policy.tokens, batch, chains, worker.ctx.device, 1.0)
    assert torch.equal(ref, expected)
    assert not torch.equal(trained, expected)  # the adapters moved the policy
    traces = [r.traces[0] for r in chains]
    _, kl = worker.engine("diffusion").module.sr.trace_log_probs_and_kl(traces, [0], worker.models.sr.reference)
    assert float(kl.detach().max()) > 0  # the trained SR model has moved away from its base
    from learner.scoring import load_sr_pipeline
    from models.sr_training import SRTraining

    _, to_reference = SRTraining(load_sr_pipeline(str(small_models["diffusion"]))).trace_log_probs_and_kl(
        traces, [0], worker.models.sr.reference)
    assert float(to_reference.detach().max()) == 0.0  # adapters and the saved conv off: exactly the base SR model


@pytest.mark.slow
def test_export_holds_the_merged_models_and_the_peft_adapters(stepped, small_models, tmp_path):
    from peft import PeftModel

    from learner.scoring import TraceScorer, load_sr_pipeline
    from models.policy import load_policy

    worker, *_ = stepped
    written = worker.export_hf(str(tmp_path))
    assert set(written) == {"policy", "diffusion", "policy_adapter", "diffusion_adapter"}
    merged = worker.gather_full_state("policy")
    exported = dict(load_policy(written["policy"], "float32", "cpu").named_parameters())
    for name, tensor in merged.items():
        if name in exported:
            assert (exported[name] - tensor).abs().max() < 1e-5, name
    # base + adapter through peft's own loading and merge: the exported merged model, to < 1e-5
    peft_merged = PeftModel.from_pretrained(load_policy(small_models["policy"], "float32", "cpu"),
                                            written["policy_adapter"]).merge_and_unload()
    for name, p in peft_merged.named_parameters():
        assert (p - exported[name]).abs().max() < 1e-5, name
    sr_merged = worker.gather_full_state("diffusion")
    sr_exported = TraceScorer(load_sr_pipeline(written["diffusion"])).state_dict()
    assert set(sr_exported) == set(sr_merged)
    assert max(float((sr_exported[n] - sr_merged[n]).abs().max()) for n in sr_merged) < 1e-5
    base_scorer = TraceScorer(load_sr_pipeline(str(small_models["diffusion"])))
    sr_peft = PeftModel.from_pretrained(base_scorer, written["diffusion_adapter"]).merge_and_unload()
    assert max(float((p - sr_exported[n]).abs().max()) for n, p in sr_peft.state_dict().items()) < 1e-5


@pytest.mark.slow
def test_the_sync_ships_the_adapters_alone_or_the_merged_weights(stepped):
    """``<model>.lora.sync``: adapters (the default) ships the trained tensors by the learner's names; merged the
    base model's full weights."""
    worker, *_ = stepped
    for model in ("policy", "diffusion"):
        cfg = worker.models.trained()[model].cfg.lora
        trained = {n for n, p in worker.engine(model).module.named_parameters() if p.requires_grad}
        assert cfg.sync == "adapters" and set(worker.sync_state(model)) == trained
        blobs, stats = worker.serialized_state(model)
        assert blobs and stats["tensors"] == len(trained) and stats["adapter_bytes"] <= stats["bytes"]
        cfg.sync = "merged"
        try:
            blobs, stats = worker.serialized_state(model)
            assert blobs and 0 < stats["adapter_bytes"] < stats["bytes"] / 4
            assert stats["tensors"] == len(worker.gather_full_state(model))
            assert set(worker.sync_state(model)) == set(worker.gather_full_state(model))
        finally:
            cfg.sync = "adapters"
