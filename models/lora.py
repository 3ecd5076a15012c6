"""LoRA adapters (peft) on a model, pure of Ray: add them (the learner's trained model, and the rollout side's copy
that receives the adapters), switch them off for the reference, and turn a gathered state into what the rollout
engines and ``from_pretrained`` load (the merged weights) or what peft and vLLM's LoRA load (the adapters alone).

The adapters are injected into the model itself (``peft.inject_adapter_in_model``): a targeted ``Linear`` /
``Conv2d`` named ``X`` becomes a peft layer holding ``X.base_layer.*`` and ``X.lora_A.default.weight`` /
``X.lora_B.default.weight``. The model class stays what it was, so DeepSpeed, the log-prob code and the
checkpoints see one module as before.

A weight sync (``<model>.lora.sync``) ships either the merged weights, which vLLM's reload and the diffusers
pipeline load by the base model's names, or the adapters alone (``trained_state``): the rollout side then holds the
same adapters over its base weights (``add_lora`` on an HF policy or the SR model, vLLM's LoRA for a served policy:
``write_vllm_adapter``), and ``adapter_bytes`` is what moves.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from core.model_config import LoraConfig

ADAPTER = "default"  # peft's adapter name; the only adapter a learner model has
_A, _B, _BASE = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight", ".base_layer."
# a module of ``modules_to_save``: peft keeps the original and trains a copy
_ORIGINAL, _SAVED = ".original_module.", f".modules_to_save.{ADAPTER}."


def is_trained(name: str) -> bool:
    """Is the parameter ``name`` of an adapted model one the learner trains (an adapter or a saved module)?"""
    return ".lora_" in name or _SAVED in name


def match_names(names: list[str], patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the names some pattern matches, the patterns that match no name), by ``re.search``, in their orders."""
    unmatched = [p for p in patterns if not any(re.search(p, n) for n in names)]
    return [n for n in names if any(re.search(p, n) for p in patterns)], unmatched


def target_names(module: nn.Module, patterns: list[str], key: str) -> list[str]:
    """Full names of the ``Linear`` / ``Conv2d`` modules of ``module`` that a pattern matches (``re.search``). A
    pattern that matches none is an error naming ``key`` and showing what the names look like."""
    layers = [n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    matched, unmatched = match_names(layers, patterns)
    if unmatched:
        raise ValueError(f"{key}.target_modules: {unmatched} match no Linear or Conv2d module of "
                         f"{type(module).__name__}; their names look like {layers[:2] + layers[-2:]}")
    return matched


def add_lora(module: nn.Module, cfg: LoraConfig, key: str) -> dict[str, float]:
    """Inject LoRA adapters into ``module`` in place and leave only them trainable. Returns each adapted layer's
    scaling (alpha / rank) by its name, which ``merge_lora`` needs. The adapters start at B = 0: the adapted model
    computes exactly what the base did."""
    import peft
    from peft.utils.other import AuxiliaryTrainingWrapper

    names = target_names(module, list(cfg.target_modules), key)
    reject_tied_targets(module, names, key)
    saved = saved_names(module, list(cfg.modules_to_save), names, key)
    peft.inject_adapter_in_model(peft_config(cfg, names, saved=saved), module, adapter_name=ADAPTER)
    wrapped = {n for n, m in module.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)}
    if wrapped != set(saved):  # peft matches modules_to_save by suffix: "norm" also takes "block.layernorm"
        raise ValueError(f"{key}.modules_to_save: peft would also train {sorted(wrapped - set(saved))} (it matches "
                         f"names by their end); choose patterns whose modules' names end no other module's name")
    for name, param in module.named_parameters():
        param.requires_grad_(is_trained(name))
    return layer_scalings(module)


def layer_scalings(module: nn.Module) -> dict[str, float]:
    """Each adapted layer's scaling (alpha / rank) by its name ({} for a model without adapters)."""
    from peft.tuners.lora import LoraLayer

    return {n: float(m.scaling[ADAPTER]) for n, m in module.named_modules() if isinstance(m, LoraLayer)}


def saved_names(module: nn.Module, patterns: list[str], targets: list[str], key: str) -> list[str]:
    """Full names of the modules a ``modules_to_save`` pattern matches (``re.search``), each the outermost match
    (a saved module is trained whole). A pattern that matches none, or a module that also holds adapters, is an
    error naming ``key``."""
    if not patterns:
        return []
    matched, unmatched = match_names([n for n, _ in module.named_modules() if n], patterns)
    if unmatched:
        raise ValueError(f"{key}.modules_to_save: {unmatched} match no module of {type(module).__name__}")
    outer = [n for n in matched if not any(n.startswith(m + ".") for m in matched)]
    clash = [n for n in outer if any(t == n or t.startswith(n + ".") for t in targets)]
    if clash:
        raise ValueError(f"{key}.modules_to_save: {clash} also hold adapters (target_modules); name each in one")
    return outer


def reject_tied_targets(module: nn.Module, names: list[str], key: str) -> None:
    """A target whose weight is shared with another module (``lm_head`` under ``tie_word_embeddings``) is an
    error: its merged weight would be written under its own name only, and a loader that re-ties the two drops it."""
    owners: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name.rpartition(".")[0])
    for name in names:
        shared = [o for o in owners.get(id(module.get_submodule(name).weight), []) if o != name]
        if shared:
            raise ValueError(f"{key}.target_modules: {name!r} shares its weight with {shared} (tied weights, e.g. "
                             f"tie_word_embeddings): an adapter on it cannot be merged into one of them alone; "
                             f"leave it out of the patterns")


def peft_config(cfg: LoraConfig, names: list[str], base_path: str | None = None,
                saved: list[str] | None = None) -> Any:
    """peft's ``LoraConfig`` for exactly the layers ``names`` (and the saved modules ``saved``)."""
    import peft

    return peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=names,
                           modules_to_save=saved or None, init_lora_weights=True, base_model_name_or_path=base_path)


@contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Inside the block ``module`` computes as its base model (every peft layer calls its base layer only, every
    saved module its original)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    layers = [m for m in module.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)  # (also makes the adapters trainable again, as add_lora left them)


class BasePolicy:
    """The reference policy of the KL term: the trained model called with its adapters off, so the frozen base
    costs no second copy in memory."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with adapters_disabled(self.model):
            return self.model(*args, **kwargs)


class BasePipeline:
    """The reference SR model of ``grpo.image_kl_beta``: the trained pipeline's learner side (``sr``, an
    ``SRTraining``) stepped with the adapters of ``adapted`` (its ``TraceScorer``) off. Offers the methods
    ``SRTraining.trace_log_probs_and_kl`` and ``SRTraining.forward_process`` call on a reference."""

    def __init__(self, sr: Any, adapted: nn.Module):
        self.sr, self.adapted = sr, adapted

    def _group_step(self, *args: Any) -> Any:
        with adapters_disabled(self.adapted):
            return self.sr._group_step(*args)

    def predict_x0(self, *args: Any) -> Any:
        with adapters_disabled(self.adapted):
            return self.sr.predict_x0(*args)


def lora_delta(a: Tensor, b: Tensor) -> Tensor:
    """B A, the weight change of one adapter: Linear ``A`` (r, in), ``B`` (out, r); Conv2d ``A`` (r, in, kh, kw)
    and ``B`` (out, r, 1, 1)."""
    if a.dim() == 2:
        return b.float() @ a.float()
    if a.dim() == 4 and b.shape[2:] == (1, 1):
        return torch.einsum("or,rihw->oihw", b[:, :, 0, 0].float(), a.float())
    raise ValueError(f"LoRA weights of shapes {tuple(a.shape)} / {tuple(b.shape)}: only Linear and Conv2d merge")


def merge_lora(state: Mapping[str, Tensor], scalings: Mapping[str, float]) -> dict[str, Tensor]:
    """The base model's state dict from an adapted one: ``X.base_layer.weight`` + scaling * B A under the name
    ``X.weight``, other base-layer tensors renamed the same way, adapter tensors dropped; a saved module's trained
    copy ``X.modules_to_save.default.*`` as ``X.*``, its original dropped."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if ".lora_" in name or _ORIGINAL in name:
            continue
        if _SAVED in name:
            out[name.replace(_SAVED, ".")] = tensor
            continue
        if _BASE in name:
            prefix, _, leaf = name.partition(_BASE)
            if leaf == "weight":
                delta = lora_delta(state[prefix + _A], state[prefix + _B])
                tensor = (tensor.float() + scalings[prefix] * delta).to(tensor.dtype)
            name = f"{prefix}.{leaf}"
        out[name] = tensor
    return out


def adapter_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The adapter tensors under peft's saved names (``base_model.model.X.lora_A.weight``; a saved module's
    ``base_model.model.X.weight``), which ``peft.PeftModel.from_pretrained`` loads onto the base model."""
    return {"base_model.model." + n.replace(_SAVED, ".").replace(f".{ADAPTER}.", "."): t
            for n, t in state.items() if is_trained(n)}


def adapter_bytes(state: Mapping[str, Tensor]) -> int:
    """What the adapters (and saved modules) alone would move in a sync."""
    return sum(t.numel() * t.element_size() for n, t in state.items() if is_trained(n))


def save_adapter(directory: str | Path, state: Mapping[str, Tensor], cfg: LoraConfig,
                 scalings: Mapping[str, float], base_path: str) -> Path:
    """``directory/adapter_model.safetensors`` + ``adapter_config.json``: peft's format, for ``PeftModel``."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter_state(state).items()}, str(out / "adapter_model.safetensors"))
    saved = sorted({n.partition(_SAVED)[0] for n in state if _SAVED in n})
    peft_config(cfg, sorted(scalings), base_path, saved).save_pretrained(str(out))
    return out


def trained_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors an adapter sync ships, by the adapted model's own names: the adapters and the saved modules'
    trained copies (what a rollout-side model with the same ``add_lora`` loads by name)."""
    return {n: t for n, t in state.items() if is_trained(n)}


def split_for_vllm(trained: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the adapters under peft's saved names, the saved modules under the base model's names): vLLM's LoRA takes
    the first as an adapter; a saved module (a norm) is no LoRA layer, so its weights go through the weight reload."""
    adapters = {"base_model.model." + n.replace(f".{ADAPTER}.", "."): t for n, t in trained.items() if ".lora_" in n}
    saved = {n.replace(_SAVED, "."): t for n, t in trained.items() if _SAVED in n}
    return adapters, saved


def write_vllm_adapter(directory: str | Path, adapters: Mapping[str, Tensor], rank: int, alpha: float) -> Path:
    """``directory`` in peft's format for vLLM's ``LoRARequest``: the adapter tensors (``split_for_vllm``'s first
    part) and a config whose targets are the layers they adapt."""
    import peft
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    layers = sorted({n.removeprefix("base_model.model.").partition(".lora_")[0] for n in adapters})
    save_file({k: v.detach().contiguous().cpu() for k, v in adapters.items()}, str(out / "adapter_model.safetensors"))
    peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=layers).save_pretrained(str(out))
    return out
