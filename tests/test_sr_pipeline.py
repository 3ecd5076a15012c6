"""models.sr_pipeline: the tiny SR diffusion policy samples, re-scores, trains and round-trips."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from core.config import TinyDiffusionConfig
from models.sr_pipeline import SRPipeline, StepSettings
from models.sr_training import SRTraining
from models.tiny import build_tiny_sr_pipeline
from models.tokenizer import build_chain_tokenizer

PROMPTS = ["a cat with whiskers", "a red rocket on a launch pad in the sky"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """2 OpenMP threads on 2 cores shared with other jobs spin at barriers (100x slower seen); 1 is fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return build_chain_tokenizer(1024)


@pytest.fixture(scope="module")
def pipe(tokenizer):
    return build_tiny_sr_pipeline(TinyDiffusionConfig(), tokenizer)


def _conditions(n=2, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _sample(pipe, size=(16, 16), steps=3, seeds=(0, 1), guidance_scale=1.0):
    n = len(seeds)
    return pipe.sample(
        _conditions(n),
        size,
        PROMPTS[:n] * (n // 2) + PROMPTS[: n % 2],
        num_steps=steps,
        settings=StepSettings(eta=1.0, noise_level=20, guidance_scale=guidance_scale),
        generator=_gens(*seeds),
        stage="rough",
    )


def test_sample_sizes_dtype_and_traces(pipe):
    images, traces = _sample(pipe, size=(24, 40), steps=4)
    assert [im.shape for im in images] == [(24, 40, 3)] * 2 and all(im.dtype == np.uint8 for im in images)
    tr = traces[0]
    assert tr.latents.shape == (5, 3, 24, 40) and tr.log_probs.shape == (4,) and tr.timesteps.shape == (4,)
    assert tr.condition.shape == (3, 24, 40) and tr.text_ids.shape == (77,) and tr.stage == "rough"
    assert tr.timesteps[0] == 999 and tr.eta == 1.0 and tr.noise_level == 20
    assert all(torch.isfinite(t.log_probs).all() and torch.isfinite(t.latents).all() for t in traces)
    # the decoded image is x_0 of the trajectory added to the bicubic upsampling (a residual model)
    base = pipe.upsample(_conditions(2)[:1], (24, 40))[0]
    x0 = (((tr.latents[-1] + base).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(images[0], x0)


def test_sampler_is_deterministic_per_generator_and_batch_invariant(pipe):
    a_img, a_tr = _sample(pipe, seeds=(0, 1))
    b_img, b_tr = _sample(pipe, seeds=(0, 1))
    assert all(np.array_equal(x, y) for x, y in zip(a_img, b_img))
    assert all(torch.equal(x.latents, y.latents) for x, y in zip(a_tr, b_tr))
    _, c_tr = _sample(pipe, seeds=(0, 2))
    assert torch.equal(c_tr[0].latents, a_tr[0].latents)  # sample 0 does not see sample 1's stream
    assert not torch.equal(c_tr[1].latents, a_tr[1].latents)
    # one generator for the batch is deterministic too
    one = [
        pipe.sample(
            _conditions(), (16, 16), PROMPTS, num_steps=2, generator=torch.Generator().manual_seed(3), stage="final"
        )[1]
        for _ in range(2)
    ]
    assert torch.equal(one[0][0].latents, one[1][0].latents)


def test_recomputed_log_probs_equal_sampling_ones(pipe):
    _, rough = _sample(pipe, size=(16, 16), steps=4, seeds=(0, 1))
    _, middle = _sample(pipe, size=(32, 32), steps=4, seeds=(2, 3))
    traces = [rough[0], middle[0], rough[1], middle[1]]  # mixed shapes, order must be kept
    with torch.no_grad():
        lp = SRTraining(pipe).trace_log_probs(traces)
        sub = SRTraining(pipe).trace_log_probs(traces, step_indices=[3, 0])
    recorded = torch.stack([t.log_probs for t in traces])
    assert lp.shape == (4, 4) and sub.shape == (4, 2)
    torch.testing.assert_close(lp, recorded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sub, recorded[:, [3, 0]], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="step_indices"):
        SRTraining(pipe).trace_log_probs(traces, step_indices=[4])


def test_log_prob_gradient_reaches_unet_and_text_encoder(pipe):
    _, traces = _sample(pipe, steps=2)
    pipe.unet.zero_grad(set_to_none=True)
    pipe.text_encoder.zero_grad(set_to_none=True)
    SRTraining(pipe).trace_log_probs(traces).mean().backward()
    unet_grads = [p.grad for p in pipe.unet.parameters() if p.grad is not None]
    text_grads = [p.grad for p in pipe.text_encoder.parameters() if p.grad is not None]
    assert unet_grads and sum(float(g.abs().sum()) for g in unet_grads) > 0
    assert text_grads and sum(float(g.abs().sum()) for g in text_grads) > 0
    assert pipe.unet.conv_in.weight.grad.abs().sum() > 0
    pipe.unet.zero_grad(set_to_none=True)
    pipe.text_encoder.zero_grad(set_to_none=True)


def test_classifier_free_guidance_is_recorded_and_rescored(pipe):
    _, plain = _sample(pipe, steps=2)
    _, guided = _sample(pipe, steps=2, guidance_scale=3.0)
    assert guided[0].guidance_scale == 3.0
    assert float((plain[0].latents[-1] - guided[0].latents[-1]).abs().max()) > 1e-3  # not numerical noise
    with torch.no_grad():
        lp = SRTraining(pipe).trace_log_probs(guided)
    torch.testing.assert_close(lp, torch.stack([t.log_probs for t in guided]), atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_gives_identical_samples(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["vae"] == [None, None] and index["_class_name"] == "SRPipeline"
    loaded = SRPipeline.from_pretrained(tmp_path)
    assert loaded.vae is None and loaded.config.max_noise_level == pipe.config.max_noise_level
    a_img, a_tr = _sample(pipe)
    b_img, b_tr = _sample(loaded)
    assert all(np.array_equal(x, y) for x, y in zip(a_img, b_img))
    assert all(torch.equal(x.log_probs, y.log_probs) for x, y in zip(a_tr, b_tr))
    assert torch.equal(a_tr[1].text_ids, b_tr[1].text_ids)  # the tokenizer round-tripped too


def test_tiny_build_is_seeded_and_attends_only_at_low_resolution(tokenizer):
    cfg = TinyDiffusionConfig()
    a = build_tiny_sr_pipeline(cfg, tokenizer)
    b = build_tiny_sr_pipeline(cfg, tokenizer)
    c = build_tiny_sr_pipeline(TinyDiffusionConfig(seed=1), tokenizer)
    sa, sb, sc = a.unet.state_dict(), b.unet.state_dict(), c.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert torch.equal(
        a.text_encoder.get_input_embeddings().weight, b.text_encoder.get_input_embeddings().weight
    )
    # self-attention token counts at a 64 px sample: only the deepest level (8x8) attends
    seen = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, kw: seen.append(args[0].shape[1]), with_kwargs=True)
        for name, m in a.unet.named_modules()
        if name.endswith("attn1")
    ]
    with torch.no_grad():
        a.unet(torch.zeros(1, 6, 64, 64), 10, torch.zeros(1, 77, 64), class_labels=torch.tensor([20]))
    for h in hooks:
        h.remove()
    assert seen and max(seen) <= 8 * 8


def test_denoising_loss_trains(tokenizer):
    pipe = build_tiny_sr_pipeline(TinyDiffusionConfig(), tokenizer)
    rng = np.random.default_rng(0)
    targets = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2)]
    conditions = [t[::2, ::2] for t in targets]  # an 8 px LR version

    def loss():
        return SRTraining(pipe).denoising_loss(targets, conditions, PROMPTS, generator=torch.Generator().manual_seed(0),
                                               stage="final")

    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    before = loss()
    assert before.ndim == 0 and torch.isfinite(before)
    for _ in range(8):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        after = loss()
    assert after < 0.9 * before
    with pytest.raises(ValueError, match="share one size"):
        SRTraining(pipe).denoising_loss([targets[0], targets[0][:8]], conditions, PROMPTS, stage="final")


def test_bad_inputs_are_named(pipe):
    with pytest.raises(ValueError, match=r"size = \(20, 16\).*multiples of 8"):
        pipe.sample(_conditions(), (20, 16), PROMPTS, stage="final")
    with pytest.raises(ValueError, match="uint8"):
        pipe.sample([np.zeros((8, 8, 3), np.float32)] * 2, (16, 16), PROMPTS, stage="final")
    with pytest.raises(ValueError, match="noise_level = 400"):
        pipe.sample(_conditions(), (16, 16), PROMPTS, settings=StepSettings(noise_level=400), stage="final")
    with pytest.raises(ValueError, match="1 prompts for 2"):
        pipe.sample(_conditions(), (16, 16), PROMPTS[:1], stage="final")
    with pytest.raises(ValueError, match="vocab_size = 10"):
        build_tiny_sr_pipeline(TinyDiffusionConfig(vocab_size=10), build_chain_tokenizer(1024))


def test_vae_branch_samples_in_latent_space_and_round_trips(pipe, tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        scaling_factor=0.5,
    )
    cfg = dict(pipe.unet.config)
    cfg.update(in_channels=4 + 3, out_channels=4)
    unet = UNet2DConditionModel.from_config(cfg)
    with pytest.raises(ValueError, match="in_channels = 6"):
        SRPipeline(
            pipe.text_encoder, pipe.tokenizer, pipe.unet, pipe.scheduler, pipe.low_res_scheduler, vae=vae
        )
    latent = SRPipeline(
        pipe.text_encoder, pipe.tokenizer, unet, pipe.scheduler, pipe.low_res_scheduler, vae=vae
    )
    assert latent.vae_scale_factor == 2
    images, traces = _sample(latent, size=(32, 32), steps=2)
    assert images[0].shape == (32, 32, 3) and images[0].dtype == np.uint8
    assert traces[0].latents.shape == (3, 4, 16, 16) and traces[0].condition.shape == (3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            SRTraining(latent).trace_log_probs(traces), torch.stack([t.log_probs for t in traces]), atol=1e-5, rtol=1e-5
        )
    loss = SRTraining(latent).denoising_loss(
        [images[0]], [_conditions(1)[0]], PROMPTS[:1], torch.Generator().manual_seed(0), stage="final"
    )
    assert torch.isfinite(loss)
    latent.save_pretrained(tmp_path)
    loaded = SRPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.vae, AutoencoderKL)
    assert all(np.array_equal(x, y) for x, y in zip(images, _sample(loaded, size=(32, 32), steps=2)[0]))


def test_a_generator_list_must_match_the_batch(pipe):
    with pytest.raises(ValueError, match="1 generators for a batch of 2"):
        pipe.sample(_conditions(2), (16, 16), PROMPTS[:2], num_steps=2, generator=_gens(0), stage="final")


def test_residual_model_adds_its_sample_to_the_bicubic_upsampling(pipe, monkeypatch):
    """The tiny models are residual (``residual``): x_0 is what the sample adds to the clean bicubic upsampling
    of its condition. A model predicting a zero residual returns that upsampling (the plain model: mid-grey), and
    the cold start's target is the image minus it."""
    from core.images import to_tensor

    assert pipe.config.residual and pipe.scheduler.config.prediction_type == "sample"
    plain = SRPipeline(pipe.text_encoder, pipe.tokenizer, pipe.unet, pipe.scheduler, pipe.low_res_scheduler)
    assert not plain.config.residual
    conditions = _conditions(2)
    bicubic = [np.asarray(((b.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0))
               for b in pipe.upsample(conditions, (16, 16))]
    for model in (pipe, plain):
        monkeypatch.setattr(model, "predict", lambda x_t, *args, **kw: torch.zeros_like(x_t))
    images, _ = pipe.sample(conditions, (16, 16), PROMPTS, num_steps=8, generator=_gens(0, 1), stage="final")
    grey, _ = plain.sample(conditions, (16, 16), PROMPTS, num_steps=8, generator=_gens(0, 1), stage="final")
    for image, base, g in zip(images, bicubic, grey):  # the last step's noise is ~0.01: a few grey levels
        assert np.abs(image.astype(int) - base.astype(int)).max() <= 6
        assert np.abs(g.astype(int) - 128).max() <= 6
    targets = [np.full((16, 16, 3), 200, np.uint8)] * 2
    loss = SRTraining(pipe).denoising_loss(targets, conditions, PROMPTS, generator=torch.Generator().manual_seed(0),
                                           stage="final")
    residual = torch.stack([to_tensor(t, low=-1.0) for t in targets]) - pipe.upsample(conditions, (16, 16))
    assert float(loss) == pytest.approx(float((residual ** 2).mean()), rel=1e-5)  # prediction 0 vs HR - bicubic
    with pytest.raises(ValueError, match="residual = True needs a pixel-space model"):
        SRPipeline(pipe.text_encoder, pipe.tokenizer, pipe.unet, pipe.scheduler, pipe.low_res_scheduler,
                   vae=AutoencoderKL(block_out_channels=(8,), norm_num_groups=8), residual=True)


def test_detail_gains_scale_the_sampled_residual_and_nothing_before_it(pipe):
    """``experimental.detail_gain_std``: the gain multiplies the sampled x_0 (the residual to the bicubic upsampling),
    which the trace's last latent holds for DiffusionNFT; every earlier latent and log-prob is the sampler's own."""
    conditions = _conditions(2)
    plain_images, plain = pipe.sample(conditions, (16, 16), PROMPTS[:2], num_steps=3, generator=_gens(0, 1),
                                      stage="final")
    images, traces = pipe.sample(conditions, (16, 16), PROMPTS[:2], num_steps=3, generator=_gens(0, 1),
                                 detail_gains=[2.0, 0.5], stage="final")
    base = pipe.upsample(conditions, (16, 16))
    for gain, tr, ref, image, b in zip((2.0, 0.5), traces, plain, images, base):
        assert torch.equal(tr.latents[:-1], ref.latents[:-1]) and torch.equal(tr.log_probs, ref.log_probs)
        torch.testing.assert_close(tr.latents[-1], gain * ref.latents[-1], atol=1e-6, rtol=0)
        want = ((b + tr.latents[-1]).clamp(-1, 1) + 1) * 127.5
        assert np.abs(image.astype(float) - want.round().permute(1, 2, 0).numpy()).max() <= 1
    assert not np.array_equal(images[0], plain_images[0])
    with pytest.raises(ValueError, match="one positive factor per image"):
        pipe.sample(conditions, (16, 16), PROMPTS[:2], num_steps=2, generator=_gens(0, 1), detail_gains=[1.0],
                    stage="final")
    with pytest.raises(ValueError, match="one positive factor per image"):
        pipe.sample(conditions, (16, 16), PROMPTS[:2], num_steps=2, generator=_gens(0, 1), detail_gains=[1.0, 0.0],
                    stage="final")
    plain_model = SRPipeline(pipe.text_encoder, pipe.tokenizer, pipe.unet, pipe.scheduler, pipe.low_res_scheduler)
    with pytest.raises(ValueError, match="this SR model is not residual"):
        plain_model.sample(conditions, (16, 16), PROMPTS[:2], num_steps=2, detail_gains=[1.0, 1.0], stage="final")


def test_a_stage_aware_model_hears_its_stage_in_sampling_and_rescoring(pipe, tmp_path):
    """The tiny model is stage-aware (a block of max_noise_level + 1 class embeddings a stage): the class label is
    stage index * 351 + noise level, so the same inputs give another image at another stage, the learner's
    re-scoring reads the stage from the trace, and a saved model loads stage-aware; a UNet with one block is
    stage-blind and keeps the noise level as its label."""
    levels = torch.tensor([20, 20, 5])
    assert pipe.stages == ("rough", "middle", "final") and pipe.unet.config.num_class_embeds == 3 * 351
    assert pipe.class_labels(levels, ["rough", "middle", "final"]).tolist() == [20, 20 + 351, 5 + 2 * 351]
    with pytest.raises(ValueError, match=r"knows the stages \['rough', 'middle', 'final'\]"):
        pipe.class_labels(levels, ["rough", "middle", "finale"])
    rough, rough_tr = _sample(pipe)
    final, final_tr = pipe.sample(_conditions(2), (16, 16), PROMPTS, num_steps=3, generator=_gens(0, 1),
                                  stage="final")
    assert not torch.equal(rough_tr[0].latents[-1], final_tr[0].latents[-1])
    # re-scoring with the trace's own stage gives the sampler's log-probs back; under another stage it does not
    rescored = SRTraining(pipe).trace_log_probs(final_tr).detach()
    torch.testing.assert_close(rescored, torch.stack([t.log_probs for t in final_tr]), atol=1e-4, rtol=0)
    relabelled = [dataclasses.replace(t, stage="rough") for t in final_tr]
    assert not torch.allclose(SRTraining(pipe).trace_log_probs(relabelled).detach(), rescored, atol=1e-3)
    pipe.save_pretrained(tmp_path)
    assert SRPipeline.from_pretrained(tmp_path).stages == ("rough", "middle", "final")
    # one block of 351 class embeddings (the stage-blind tiny layout before 2026-12-07): the label is the level
    blind_unet = UNet2DConditionModel.from_config({**pipe.unet.config, "num_class_embeds": 351})
    blind = SRPipeline(pipe.text_encoder, pipe.tokenizer, blind_unet, pipe.scheduler, pipe.low_res_scheduler)
    assert blind.stages == () and torch.equal(blind.class_labels(levels, ["rough", "middle", "final"]), levels)
