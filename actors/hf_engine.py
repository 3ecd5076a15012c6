"""The fallback text engine: HF ``generate`` on the same Qwen2.5-VL (``actors.text_engine`` has the contract)."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from actors.text_engine import BaseTextEngine, TextEngineSpec, TextRequest, TextSample, finish_reason
from core.config import SamplingConfig
from models.policy import load_policy

_LEGACY_PREFIXES = (
    ("model.visual.", "model.visual."),
    ("visual.", "model.visual."),
    ("model.language_model.", "model.language_model."),
    ("model.", "model.language_model."),
)


def hf_param_name(name: str) -> str:
    """Checkpoint names (``model.layers.0...``, ``visual.blocks...``, as transformers 5 writes them to disk)
    -> in-memory names (``model.language_model.layers.0...``, ``model.visual.blocks...``); vLLM accepts both.
    """
    for old, new in _LEGACY_PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _stop_per_row(stop_sets: list[set[int]]):
    """A StoppingCriteria: row i is done once its last token is in its own stop set (rows' turns may differ).
    """
    from transformers import StoppingCriteria

    class StopPerRow(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            last = input_ids[:, -1].tolist()
            return torch.tensor(
                [t in s for t, s in zip(last, stop_sets)], dtype=torch.bool, device=input_ids.device
            )

    return StopPerRow()


class HFTextEngine(BaseTextEngine):
    """The fallback engine: HF ``generate`` on the same Qwen2.5-VL, all requests of a call in one left-padded
    batch.

    Slower than vLLM (no paged KV cache, no continuous batching) but needs nothing beyond transformers, so it
    runs where vLLM is not installed. Per-request seeds are not separable inside one batch: a call is seeded
    with its first request's seed.
    """

    def __init__(self, spec: TextEngineSpec, model=None):
        """``spec``: the policy, sampling, budget, ``dtype`` and ``device``; with ``spec.lora``, the learner's adapters
        are injected by the learner's names (B = 0 until the first sync). ``model``: an already loaded policy."""
        from transformers import GenerationConfig

        super().__init__(spec)
        self.device = spec.device
        self.model = model if model is not None else load_policy(spec.policy_path, dtype=spec.dtype,
                                                                   device=spec.device)
        tok = self.tokens.tokenizer
        # A clean generation config: a hub checkpoint's defaults (e.g. Qwen's repetition_penalty=1.05,
        # top_k=1) must not leak into RL sampling, nor HF's global default top_k=50 (set explicitly below).
        self.model.generation_config = GenerationConfig(
            bos_token_id=tok.pad_token_id, eos_token_id=sorted(self.eos_ids), pad_token_id=tok.pad_token_id
        )
        self.banned_ids = self.tokens.banned_ids(self.model.config.get_text_config().vocab_size)
        if spec.lora is not None:
            from models.lora import add_lora

            add_lora(self.model, spec.lora, "policy.lora")
            self.model.requires_grad_(False)

    def _generation_config(self, s: SamplingConfig, max_new_tokens: int):
        from transformers import GenerationConfig

        greedy = s.temperature == 0
        return GenerationConfig(
            do_sample=not greedy,
            temperature=1.0 if greedy else s.temperature,
            top_p=1.0 if greedy else s.top_p,
            top_k=0 if (greedy or s.top_k < 0) else s.top_k,
            repetition_penalty=1.0,
            suppress_tokens=self.banned_ids,  # never sample vision tokens / padded vocab rows
            max_new_tokens=max_new_tokens,
            num_beams=1,
            output_scores=True,
            return_dict_in_generate=True,
            bos_token_id=self.model.generation_config.bos_token_id,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.tokens.tokenizer.pad_token_id,
        )

    @torch.no_grad()
    def _generate(self, requests: Sequence[TextRequest], sampling: SamplingConfig) -> list[list[TextSample]]:
        from transformers import StoppingCriteriaList

        rows = [i for i, r in enumerate(requests) for _ in range(r.n)]
        budgets = [requests[i].max_tokens or self.max_tokens for i in rows]
        stop_sets = [set(requests[i].stop_token_ids) for i in rows]
        batch = self.tokens.batch_inputs(
            [requests[i].context_ids for i in rows], [requests[i].images for i in rows], padding_side="left"
        )
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        prompt_len = batch["input_ids"].shape[1]
        seed = self._seeds(requests[0])
        state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        try:
            out = self.model.generate(
                **batch,
                generation_config=self._generation_config(sampling, max(budgets)),
                stopping_criteria=StoppingCriteriaList(
                    [_stop_per_row([s | self.eos_ids for s in stop_sets])]
                ),
            )
        finally:
            if seed is not None:
                torch.random.set_rng_state(state)
        sampled = out.sequences[:, prompt_len:]  # (rows, steps)
        new = sampled.tolist()
        # per step, so a 150k vocabulary never materialises (rows, steps, V) log-probs
        picked = torch.stack(
            [
                scores.float().gather(-1, sampled[:, k : k + 1]).squeeze(-1)
                - torch.logsumexp(scores.float(), dim=-1)
                for k, scores in enumerate(out.scores)
            ],
            dim=1,
        ).tolist()  # (rows, steps)
        results: list[list[TextSample]] = [[] for _ in requests]
        for row, req_idx in enumerate(rows):
            ids: list[int] = []
            for t in new[row][: budgets[row]]:
                ids.append(t)
                if t in stop_sets[row] or t in self.eos_ids:
                    break
            results[req_idx].append(
                TextSample(
                    token_ids=tuple(ids),
                    log_probs=tuple(picked[row][: len(ids)]),
                    text=self.tokens.decode(ids),
                    finish_reason=finish_reason(ids, stop_sets[row], self.eos_ids),
                )
            )
        return results

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            name = hf_param_name(name)
            if name not in params:
                raise KeyError(f"load_weights: {name!r} is not a parameter of the policy")
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"load_weights: {name!r} has shape {tuple(tensor.shape)}, "
                    f"the policy's is {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)
        self.version = version


