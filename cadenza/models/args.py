"""Typed model arguments filled from config.json; each family's config extends `ModelArgs`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from cadenza.errors import CadenzaError
from cadenza.models.rope import RopeParameters

_MISSING = object()


@dataclass
class ModelArgs:
    """The fields every decoder family shares, named as in transformers' configs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope: RopeParameters = field(default_factory=RopeParameters)
    eos_token_id: list[int] = field(default_factory=list)
    bos_token_id: int | None = None

    DEFAULT_ROPE_THETA: ClassVar[float] = 10000.0

    @property
    def context_length(self) -> int:
        """The longest sequence the model is meant for: dynamic NTK scaling stretches max_position_embeddings by
        its factor; the other scaled variants already state the extended length there."""
        if self.rope.rope_type == "dynamic":
            return int(self.max_position_embeddings * (self.rope.extra or {}).get("factor", 1.0))
        return self.max_position_embeddings

    @staticmethod
    def require(cfg: dict, key: str) -> Any:
        value = cfg.get(key, _MISSING)
        if value is _MISSING or value is None:
            raise CadenzaError(
                f"config.json has no {key!r}, which this architecture needs. The file is incomplete or belongs to "
                "another model: download config.json again from the model's repository."
            )
        return value

    @classmethod
    def common_fields(cls, cfg: dict) -> dict[str, Any]:
        req = cls.require
        heads = req(cfg, "num_attention_heads")
        eos = cfg.get("eos_token_id")
        return dict(
            vocab_size=req(cfg, "vocab_size"),
            hidden_size=req(cfg, "hidden_size"),
            intermediate_size=req(cfg, "intermediate_size"),
            num_hidden_layers=req(cfg, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or req(cfg, "hidden_size") // heads,
            hidden_act=cfg.get("hidden_act", "silu"),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope=RopeParameters.from_config(cfg, cls.DEFAULT_ROPE_THETA),
            eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            bos_token_id=cfg.get("bos_token_id"),
        )
