"""How the GPU side computes a layer's routed experts, whatever format they are stored in.

Two ways, per format (plain stacks in the compute dtype, or the tiled bf16 / int8 / int4 / block-format layout of
cadenza.kernels.layout, the same bytes as in host memory):

- `run`: expert by expert, each expert's tokens through matrix products (quantized experts are dequantized to the
  compute dtype first): the prefill path, where each expert has many tokens. Needs the per-expert token counts on
  the host.
- `decode`: all (token, slot) pairs of a few tokens in a fixed number of launches of the indexed kernels of
  cadenza.kernels.gpu_moe (of many tokens: gpu_grouped's grouped products, unless CADENZA_GROUPED_EXPERTS=0): a
  pair's expert is a row of a stacked tensor (the layer's residents, or the fetch slots), -1 skips the pair.
  Nothing is read back to the host, so a layer whose experts are all resident runs without a synchronisation (and
  can be captured in a CUDA graph).

Shape legend: T tokens, k slots per token, H hidden, I intermediate, E experts, R stacked rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cadenza.kernels.blocks import BLOCK_FORMATS
from cadenza.models.common import glu_fn
from cadenza.moe.experts import Experts, each_expert, run_experts


@dataclass(frozen=True)
class ExpertLayout:
    """What the GPU side needs to know to compute a layer's experts: the storage format ("plain": stacked gate,
    up [., I, H] and down [., H, I] in the compute dtype, then biases if the experts have them; or a tiled "bf16",
    "int8", "int4" with its scale group, or a block format of cadenza.kernels.blocks, "q4_k" or a "gate_up+down"
    pair such as "q4_k+q6_k", whose groups are its own), the sizes, the activation's name, and whether the
    experts are what the fused kernels compute (`Experts.plain_math`; else PyTorch's products)."""

    fmt: str
    group: int
    hidden: int
    intermediate: int
    act: str
    kernel_math: bool = True

    @classmethod
    def of(cls, experts: Experts) -> ExpertLayout:
        p = getattr(experts, "packed", None)
        if p is None:
            h, i = experts.hidden_size, experts.intermediate_size
            return cls("plain", 0, h, i, experts.hidden_act, experts.plain_math)
        from cadenza.kernels.cpu_moe import kernel_act

        # the kernels compute biases and the clamped SwiGLU too: only an activation they lack needs PyTorch's
        return cls(
            p.fmt, p.group, p.hidden, p.intermediate, experts.hidden_act, kernel_act(experts.hidden_act) is not None
        )

    @property
    def plain(self) -> bool:
        return self.fmt == "plain"

    def describe(self) -> str:
        if self.plain:
            return "plain"
        block = all(f in BLOCK_FORMATS for f in self.fmt.split("+"))  # groups fixed by the formats
        return f"{self.fmt}" + (f"/g{self.group}" if self.group and not block else "")

    def _tiled(self) -> dict:
        return {"fmt": self.fmt, "group": self.group, "hidden": self.hidden, "intermediate": self.intermediate}

    def run(
        self,
        x: torch.Tensor,
        k: int,
        topk_weights: torch.Tensor,
        order: torch.Tensor,
        counts: list[int],
        experts: list[int],
        weights_of,
        y: torch.Tensor,
    ) -> None:
        """y += each given expert's weighted output for its tokens (as `run_experts`); weights_of(e) -> the
        tensors holding expert e on this side (a resident row, a fetch slot); tiled: (gate_up, down) or (gate_up,
        down, gate_bias [I], up_bias [I], down_bias [H]) (a bias possibly None)."""
        if self.plain:
            run_experts(x, k, topk_weights, order, counts, experts, weights_of, glu_fn(self.act), y)
            return
        from cadenza.kernels.gpu_moe import expert_forward

        flat_w = topk_weights.reshape(-1)
        for e, pairs, tokens in each_expert(order, counts, experts, k):
            gate_up, down, *biases = weights_of(e)
            ye = expert_forward(
                x[tokens], gate_up, down, act=self.act, **self._tiled(), biases=_biases(biases)
            )  # fp32 [n, H]
            y.index_add_(0, tokens, (ye * flat_w[pairs, None]).to(y.dtype))

    def decode(
        self,
        x: torch.Tensor,
        rows: torch.Tensor,
        topk_weights: torch.Tensor,
        stacks: list[torch.Tensor],
        grouped: bool = False,
        row_counts: list[int] | None = None,
    ) -> torch.Tensor:
        """[T, H]: the pairs whose `rows` [T, k] entry names a row of `stacks` (-1: skipped), weighted and summed.
        Tiled stacks: [gate_up, down] or [gate_up, down, gate_bias [R, I], up_bias [R, I], down_bias [R, H]] (a
        bias possibly None). grouped: through gpu_grouped's products (the caller's choice, for many tokens where
        `grouped(device)` holds: LayerOffload.decode_rows); row_counts: how many pairs name each row of the stacks,
        where the host knows it (gpu_grouped's `row_counts`)."""
        from cadenza.kernels.gpu_moe import moe_decode

        if self.plain:
            return moe_decode(x, rows, topk_weights, tuple(stacks), self.act)
        gate_up, down, *biases = stacks
        kw = self._tiled()
        if grouped:
            from cadenza.kernels.gpu_grouped import moe_grouped

            b = _biases(biases)
            mats = (gate_up, down)
            return moe_grouped(x, rows, topk_weights, mats, self.act, **kw, biases=b, row_counts=row_counts)
        return moe_decode(x, rows, topk_weights, (gate_up, down), self.act, **kw, biases=_biases(biases))

    def grouped(self, device: torch.device) -> bool:
        """Whether `decode` may run this layout's calls of many tokens as one grouped product a matrix
        (cadenza.kernels.gpu_grouped: tiled experts, the Triton kernels on `device`, CADENZA_GROUPED_EXPERTS not 0)."""
        if self.plain:
            return False
        from cadenza.kernels.gpu_grouped import enabled

        return enabled(device, self.fmt)


def _biases(biases: list) -> tuple | None:
    """A tiled expert's trailing tensors -> moe_decode's / expert_forward's biases (None: there are none)."""
    if not biases:
        return None
    if len(biases) != 3:
        raise ValueError(f"tiled experts are gate_up, down and optionally 3 biases, got {2 + len(biases)} tensors")
    return tuple(biases)


def decode_kernels_on(layout: ExpertLayout, device: torch.device, gpu_kernel: bool = True) -> bool:
    """Whether the GPU side uses the indexed decode kernels for a few tokens. Quantized experts always do (on a CPU
    "GPU side" through the kernels' torch fallback, so the emulated mode runs the same path); plain experts do on
    CUDA when Triton is there, unless gpu_kernel is False (then: the per-expert products)."""
    if not layout.plain:
        return True
    if device.type != "cuda" or not gpu_kernel or not layout.kernel_math:
        return False
    from cadenza.kernels.gpu_moe import available

    return available(device)
