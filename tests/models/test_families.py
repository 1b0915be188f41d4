"""What every family must do alike, once per family: cadenza's greedy generation equals transformers' token for
token (each family's tiny checkpoint as its own file builds it); family-specific tests stay in their files."""

from __future__ import annotations

import pytest
import torch

from cadenza import LLM, SamplingParams
from tests.conftest import make_mixtral, prompt_ids, reference_greedy
from tests.models import test_deepseek_v2 as v2
from tests.models import test_deepseek_v3 as v3
from tests.models.test_dots1 import CONFIGS as DOTS1_CONFIGS
from tests.models.test_dots1 import make_dots1
from tests.models.test_ernie4_5_moe import CONFIGS as ERNIE_CONFIGS
from tests.models.test_ernie4_5_moe import make_ernie
from tests.models.test_glm4_moe import CONFIGS as GLM_CONFIGS
from tests.models.test_glm4_moe import make_glm4_moe
from tests.models.test_glm4_moe_lite import CONFIGS as GLM_LITE_CONFIGS
from tests.models.test_glm4_moe_lite import make_glm4_moe_lite
from tests.models.test_gpt_oss import make_gpt_oss
from tests.models.test_llama4 import make_llama4
from tests.models.test_minimax_m2 import CONFIGS as MINIMAX_M2_CONFIGS
from tests.models.test_minimax_m2 import make_minimax_m2
from tests.models.test_olmoe import CONFIGS as OLMOE_CONFIGS
from tests.models.test_olmoe import make_olmoe
from tests.models.test_phimoe import longrope, make_phimoe
from tests.models.test_qwen2_moe import make_qwen2_moe
from tests.models.test_qwen3_5_moe import make_qwen3_5_moe
from tests.models.test_qwen3_moe import CONFIGS as QWEN3_CONFIGS
from tests.models.test_qwen3_moe import make_qwen3_moe
from tests.models.test_qwen3_next import CONFIGS as QWEN3_NEXT_CONFIGS
from tests.models.test_qwen3_next import make_qwen3_next

# family -> its tiny checkpoint for greedy generation: (folder, the fp32 transformers model)
GREEDY_MODELS = {
    "mixtral": lambda path: make_mixtral(path),
    "qwen2_moe": lambda path: make_qwen2_moe(path, num_hidden_layers=3, mlp_only_layers=[0], num_experts=6),
    "qwen3_moe": lambda path: make_qwen3_moe(path, **QWEN3_CONFIGS["top4-of-16-dense-layer-1"]),
    "olmoe": lambda path: make_olmoe(path, num_hidden_layers=3, **OLMOE_CONFIGS["gqa2-top2-of-6-clip-normed"]),
    "phimoe": lambda path: make_phimoe(path, rope_parameters=longrope(orig=48)),  # stays short throughout
    "deepseek_v2": lambda path: v2.make_v2(path, q_lora_rank=24, rope_parameters=v2.YARN),
    "deepseek_v3": lambda path: v3.make_v3(path, num_hidden_layers=4, first_k_dense_replace=2, rope_parameters=v3.YARN),
    "glm4_moe": lambda path: make_glm4_moe(path, mtp=True, **GLM_CONFIGS["quarter-rotary-yarn-gqa4"]),
    "glm4_moe_lite": lambda path: make_glm4_moe_lite(
        path, mtp=True, **GLM_LITE_CONFIGS["halves-yarn-no-q-lora-groups"]
    ),
    "gpt_oss": lambda path: make_gpt_oss(path),  # window 5: decoding slides past it
    "ernie4_5_moe": lambda path: make_ernie(path, mtp=True, **ERNIE_CONFIGS["yarn-head-dim-gqa4-top3"]),
    "minimax_m2": lambda path: make_minimax_m2(path, **MINIMAX_M2_CONFIGS["quarter-rotary-yarn-top1-tied"]),
    "llama4": lambda path: make_llama4(path),  # chunks of 8: decoding crosses several; a NoPE layer, top-1
    # linear-attention layers' states through a prefill and 32 one-token steps
    "qwen3_next": lambda path: make_qwen3_next(path, **QWEN3_NEXT_CONFIGS["half-rotary-bias-kernel-3"]),
    "qwen3_5_moe": lambda path: make_qwen3_5_moe(path),  # the multimodal checkpoint, text only
    "dots1": lambda path: make_dots1(path, **DOTS1_CONFIGS["sliding-gqa4-tied"]),  # decoding slides past window 5
}


@pytest.mark.parametrize("family", list(GREEDY_MODELS))
def test_greedy_generation_matches_transformers(tmp_path, family):
    path, hf = GREEDY_MODELS[family](tmp_path / "gen")
    ids = prompt_ids(10)
    out = LLM(path, device="cpu", dtype="float32").generate(
        ids, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    )
    assert out.token_ids == reference_greedy(hf, ids, 32)
    assert len(out.token_ids) == 32 and out.finish_reason == "length"


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "qwen3_next"])
def test_routing_weights_in_bf16_equal_transformers(tmp_path, family):
    """In bf16 a layer's top-k choice and weights equal transformers' router's, bit for bit: OLMoE's and the Qwen
    MoE routers round the weights to the compute dtype, Mixtral's keeps them float32."""
    import transformers

    path, _ = GREEDY_MODELS[family](tmp_path / family)
    arch = LLM(path, device="cpu", dtype="float32").config.__class__.__name__.replace("Config", "ForCausalLM")
    hf = getattr(transformers, arch).from_pretrained(path, dtype=torch.bfloat16)
    llm = LLM(path, device="cpu", dtype="bfloat16")
    layer = next(i for i, m in enumerate(hf.model.layers) if hasattr(m.mlp, "experts"))
    x = torch.randn(16, hf.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        _, want_w, want_ids = hf.model.layers[layer].mlp.gate(x)
        block = llm.model.model.layers[layer]
        got_w, got_ids = getattr(block, block.mlp_name).route(x)
    order_w, order_got = want_ids.sort(-1), got_ids.sort(-1)
    assert torch.equal(order_w.values, order_got.values)
    assert torch.equal(want_w.float().gather(1, order_w.indices), got_w.gather(1, order_got.indices))
