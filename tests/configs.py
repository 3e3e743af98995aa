"""Run configs for tests that drive a trainer group directly, from the flat settings such a test cares about."""
from __future__ import annotations

from rlhf.core.config.run_config import EngineConfig, RunConfig

ENGINE_KEYS = set(EngineConfig.model_fields)
# Flat test names of settings that live elsewhere in the tree.
ELSEWHERE = {"seed": ("seed",), "timeout_s": ("call_timeout_s",), "temperature": ("rollout", "temperature"),
             "mini_batches": ("trainer", "mini_batches_per_step"), "epochs": ("algorithm", "ppo_epochs"),
             "asynchronous": ("rollout", "asynchronous"), "lora": ("model", "lora")}


def run_config(flat: dict, role: str = "trainer") -> RunConfig:
    """``flat``: engine settings (for the ``role`` section: trainer, critic or reward_model), algorithm settings
    (clip_low, kl_coef, tis_cap, value_clip, ...) and the few named in ELSEWHERE."""
    data: dict = {role: {}, "algorithm": {}, "rollout": {}}
    for key, value in flat.items():
        if key in ELSEWHERE:
            *sections, name = ELSEWHERE[key]
            node = data
            for section in sections:
                node = node.setdefault(section, {})
            node[name] = value
        elif key in ENGINE_KEYS:
            data[role][key] = value
        else:
            data["algorithm"][key] = value
    return RunConfig.model_validate(data)
