"""Registry of model families: config.json's "architectures"[0] -> the module, config and model classes that
implement it. Loading a checkpoint into one is cadenza.loader's work."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from cadenza.checkpoint import Checkpoint
from cadenza.errors import CadenzaError


@dataclass(frozen=True)
class Family:
    module: str  # cadenza.models.<module>
    config_class: str
    model_class: str


ARCHITECTURES: dict[str, Family] = {
    "MixtralForCausalLM": Family("mixtral", "MixtralConfig", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": Family("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": Family("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "Qwen3NextForCausalLM": Family("qwen3_next", "Qwen3NextConfig", "Qwen3NextForCausalLM"),
    "Qwen3_5MoeForCausalLM": Family("qwen3_5_moe", "Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM"),
    # the hub's multimodal config.json (Qwen3.5 MoE): its text model only, under model.language_model.
    "Qwen3_5MoeForConditionalGeneration": Family(
        "qwen3_5_moe", "Qwen3_5MoeTextConfig", "Qwen3_5MoeForConditionalGeneration"
    ),
    "OlmoeForCausalLM": Family("olmoe", "OlmoeConfig", "OlmoeForCausalLM"),
    "PhimoeForCausalLM": Family("phimoe", "PhimoeConfig", "PhimoeForCausalLM"),
    # the name Phi-3.5-MoE's config.json on the hub uses
    "PhiMoEForCausalLM": Family("phimoe", "PhimoeConfig", "PhimoeForCausalLM"),
    "DeepseekV2ForCausalLM": Family("deepseek_v2", "DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "DeepseekV3ForCausalLM": Family("deepseek_v3", "DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "Dots1ForCausalLM": Family("dots1", "Dots1Config", "Dots1ForCausalLM"),
    "GptOssForCausalLM": Family("gpt_oss", "GptOssConfig", "GptOssForCausalLM"),
    "Glm4MoeForCausalLM": Family("glm4_moe", "Glm4MoeConfig", "Glm4MoeForCausalLM"),
    "Glm4MoeLiteForCausalLM": Family("glm4_moe_lite", "Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM"),
    "Ernie4_5_MoeForCausalLM": Family("ernie4_5_moe", "Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM"),
    "MiniMaxM2ForCausalLM": Family("minimax_m2", "MiniMaxM2Config", "MiniMaxM2ForCausalLM"),
    "Llama4ForCausalLM": Family("llama4", "Llama4TextConfig", "Llama4ForCausalLM"),
    # the hub's multimodal config.json (Llama-4 Scout / Maverick): its text model only, under language_model.
    "Llama4ForConditionalGeneration": Family("llama4", "Llama4TextConfig", "Llama4ForConditionalGeneration"),
}


def family_of(checkpoint: Checkpoint):
    """Returns (config class, model class) for a checkpoint's architecture, or a clear error."""
    arch = checkpoint.architecture
    if arch not in ARCHITECTURES:
        raise CadenzaError(
            f"{checkpoint.path} holds a {arch!r} model, which cadenza does not support. Supported architectures: "
            f"{', '.join(sorted(ARCHITECTURES))}. Use a checkpoint of one of these."
        )
    fam = ARCHITECTURES[arch]
    module = importlib.import_module(f"cadenza.models.{fam.module}")
    return getattr(module, fam.config_class), getattr(module, fam.model_class)


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)
