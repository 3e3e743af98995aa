"""LoRA through ``peft`` for every trainer (the policy, PPO's critic, the reward model): wrapping a model, the
reference from the same model with its adapters off, merged Hugging Face weights for rollout workers and exports,
and the adapter directory kept beside an export.

Settings arrive as a plain dict (``LoraSettings.model_dump()``: r, alpha, dropout, target_modules) or None for full
fine-tuning. A value or reward model's heads are fresh, so they train whole: peft's ``modules_to_save`` keeps a
trainable copy of each (saved with the adapters, so a PEFT user's adapter directory is complete), and merging puts
that copy under the head's own name. Merging is done on a state dict, not on the model: under ZeRO-3 the gathered weights are a
copy anyway, and the training model must keep its separate adapters.
"""
from __future__ import annotations

import os

import torch

# Where a wrapped model's own (Hugging Face) parameter names start inside the peft model's state dict.
_PEFT_PREFIX = "base_model.model."
_ADAPTER = "default"  # peft's name for the one adapter wrap adds
ADAPTER_DIR = "adapter"  # the PEFT adapter directory inside an exported (merged) policy directory


def is_peft(model) -> bool:
    """Whether ``model`` is a peft-wrapped model (what ``wrap`` returns)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def wrap(model, settings: dict, heads: tuple[str, ...] = (), key: str = "model.lora"):
    """``model`` with LoRA adapters on ``settings["target_modules"]``; only the adapters (and the modules named in
    ``heads``, whole) train: the base weights are frozen, so the optimizer holds state for the adapters alone.
    Refuses a target that is not a plain ``nn.Linear`` (embeddings, GPT-2's Conv1D), which ``merged_state_dict``
    would merge wrongly. ``key``: the config section named in errors."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    # A causal LM gets peft's causal-LM wrapper (generation helpers); a model with heads the plain PeftModel, whose
    # forward passes every argument through (the reward model's read_index, packed position_ids).
    config = LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                        target_modules=list(settings["target_modules"]), bias="none",
                        modules_to_save=list(heads) or None, task_type=None if heads else "CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"{key}.target_modules: {' '.join(str(err).split())[:200]}") from None
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and (not isinstance(module, LoraLinear) or module.fan_in_fan_out):
            raise ValueError(f"{key}.target_modules: {name} is a {type(module).__name__}, not a plain "
                             f"Linear layer: target the attention and MLP projections (q_proj, v_proj, ...)")
    if getattr(model, "is_activation_checkpointing", False):
        # Recomputed segments need an input that requires grad, which frozen embeddings no longer give.
        peft_model.enable_input_require_grads()
    return peft_model


def cast_inputs(peft_model, cast: bool) -> None:
    """Whether each adapter casts its input to its weights' dtype before the adapter's matrix products (peft's
    default). Under CPU bf16 autocast the adapters' fp32 weights make that a cast of every adapted layer's input to
    fp32 and straight back to bf16 for the product, forward and backward, for nothing: autocast computes the
    product in bf16 either way (tests/rlhf/core/models/test_lora.py). Turned off for a bf16 CPU update only; without
    autocast a dtype mismatch needs the cast."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in peft_model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = cast


def scaling(peft_model) -> float:
    """LoRA's factor on B @ A (alpha / r) of the model's adapter."""
    config = peft_model.peft_config["default"]
    return config.lora_alpha / config.r


def hf_state_dict(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model``'s (gathered) state dict as a plain Hugging Face model's: merged if ``model`` carries LoRA
    adapters, as it is otherwise. What rollout workers load and exports hold."""
    return merged_state_dict(state_dict, scaling(model)) if is_peft(model) else state_dict


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters an optimizer should hold: all of them in full fine-tuning, the adapters with LoRA."""
    return [p for p in model.parameters() if p.requires_grad]


class AdaptersOff:
    """The reference policy without a second copy: the peft model called with its adapters disabled, i.e. the
    frozen base weights. Callable like a model; gradients are never taken through it."""

    def __init__(self, peft_model):
        self.model = peft_model

    def get_output_embeddings(self):
        """The head, shared with the policy (rlhf/core/models/response_head.py cuts its input)."""
        return self.model.get_output_embeddings()

    @torch.no_grad()
    def __call__(self, **inputs):
        # In eval mode whatever mode training left the model in: the reference is the base model at inference, so
        # no dropout (a separately loaded reference is in eval mode too).
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return self.model(**inputs)
        finally:
            self.model.train(was_training)


def merged_state_dict(state_dict: dict[str, torch.Tensor], lora_scaling: float) -> dict[str, torch.Tensor]:
    """A peft LoRA model's state dict as the plain model's: Hugging Face names, each adapted weight W replaced by
    W + scaling * B @ A (``merge_weight``), the adapter tensors and the heads' frozen originals dropped, the heads'
    trained copies under the heads' names. Tensors that were shared (tied embeddings) stay shared."""
    return {hf_name: merge_weight(parts, lora_scaling)
            for hf_name, parts in hf_sources(list(state_dict.items())).items()}


def hf_sources(named: list[tuple[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """What each of the plain model's tensors is made of, by Hugging Face name, in ``named``'s order (a peft
    model's tensors by its own names): [W, lora_A, lora_B] for an adapted weight, [tensor] for the others."""
    by_name = dict(named)
    sources = {}
    for name, tensor in named:
        if ".lora_" in name or ".original_module." in name:
            continue
        layer, _, leaf = name.rpartition(".")
        parts = [tensor]
        if layer.endswith(".base_layer") and leaf == "weight":
            owner = layer.removesuffix(".base_layer")
            parts += [by_name[f"{owner}.lora_A.{_ADAPTER}.weight"], by_name[f"{owner}.lora_B.{_ADAPTER}.weight"]]
        sources[_hf_name(name)] = parts
    return sources


def merge_weight(parts: list[torch.Tensor], lora_scaling: float) -> torch.Tensor:
    """One tensor of the plain model from its ``hf_sources`` parts: W + scaling * B @ A computed in float32 and
    stored in W's dtype; an unadapted tensor as it is."""
    if len(parts) == 1:
        return parts[0]
    weight, lora_a, lora_b = parts
    return (weight.float() + lora_scaling * (lora_b.float() @ lora_a.float())).to(weight.dtype)


def _hf_name(peft_name: str) -> str:
    return (peft_name.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")
            .replace(f".modules_to_save.{_ADAPTER}.", "."))


def save_merged_with_adapter(peft_model, state_dict: dict[str, torch.Tensor], path) -> None:
    """Write ``path`` as a plain Hugging Face directory of the merged weights (loads with AutoModelForCausalLM,
    no peft needed), and the adapters alone in ``path/adapter`` (``PeftModel.from_pretrained(base, ...)``).
    ``state_dict``: the peft model's full state dict (gathered under ZeRO-3)."""
    peft_model.get_base_model().save_pretrained(path, state_dict=merged_state_dict(state_dict, scaling(peft_model)))
    peft_model.save_pretrained(os.path.join(path, ADAPTER_DIR), state_dict=state_dict,
                               save_embedding_layers=False)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters of ``model``, also when ZeRO-3 has partitioned them (``ds_numel``: full size)."""
    def size(p):
        return getattr(p, "ds_numel", p.numel())

    return sum(size(p) for p in trainable_parameters(model)), sum(size(p) for p in model.parameters())
