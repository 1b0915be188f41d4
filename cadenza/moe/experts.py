"""The expert seam: `experts(x, topk_ids, topk_weights) -> y`, wherever each expert lives.

A family's MoE block computes routing in plain view and calls this module; it never knows where an expert's
weights are. Work that does not depend on where experts live (shared experts) comes in as `shared`, a callable whose
[T, H] result is added: the offloaded path queues it on the GPU right after handing the CPU its experts, so the two
run at once. The weights of all experts of a layer are stacked ([E, I, H] for gate and up, [E, H, I] for down);
parameter names keep the checkpoint's (Mixtral: w1 gate, w3 up, w2 down; Qwen/OLMoE: gate_proj, up_proj,
down_proj), so `experts.{e}.{name}.weight` in a checkpoint lands in row e of the stacked parameter `{name}`.

Quantized experts (`quantize`, `set_packed`): the layer's weights then live in `packed`, int8 or int4 tiles in the
fused CPU kernel's layout (cadenza.kernels.layout), in host memory; the stacked parameters are dropped and become
meta tensors (same shapes and dtype, no memory): their shapes stay readable, any use of their values fails.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cadenza.errors import CadenzaError
from cadenza.kernels import layout
from cadenza.kernels.layout import PackedExperts
from cadenza.models.common import glu_fn


class Experts(nn.Module):
    """A layer's routed gated experts. Shapes: x [T, H], topk_ids / topk_weights [T, k] -> y [T, H].

    Expert e computes down_e(glu(gate_e x + b_gate_e, up_e x + b_up_e)) + b_down_e: `glu` from the activation's
    name (cadenza.models.common.glu_fn); the biases exist only with `bias=True` (gpt-oss), as parameters
    gate_bias, up_bias [E, I] and down_bias [E, H]."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str,
        names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
        bias: bool = False,
    ):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_name, self.up_name, self.down_name = names
        self.glu = glu_fn(hidden_act)
        self.hidden_act = hidden_act  # the name, for kernels that take the activation by name
        self.bias = bias
        e, h, i = num_experts, hidden_size, intermediate_size
        for name, shape in ((self.gate_name, (e, i, h)), (self.up_name, (e, i, h)), (self.down_name, (e, h, i))):
            self.register_parameter(name, nn.Parameter(torch.empty(shape), requires_grad=False))
        if bias:
            for name, shape in (("gate_bias", (e, i)), ("up_bias", (e, i)), ("down_bias", (e, h))):
                self.register_parameter(name, nn.Parameter(torch.empty(shape), requires_grad=False))
        self.packed: PackedExperts | None = None  # None: the experts are the stacked parameters
        self._filled: set[tuple[int, str]] = set()  # (expert, name) rows loaded so far

    @property
    def gate(self) -> torch.Tensor:
        return getattr(self, self.gate_name)

    @property
    def up(self) -> torch.Tensor:
        return getattr(self, self.up_name)

    @property
    def down(self) -> torch.Tensor:
        return getattr(self, self.down_name)

    def checkpoint_shapes(self, prefix: str) -> dict[str, tuple[int, ...]]:
        """The per-expert tensor names and shapes this module expects in a checkpoint."""
        out = {}
        for name in (self.gate_name, self.up_name, self.down_name):
            shape = tuple(getattr(self, name).shape[1:])
            for e in range(self.num_experts):
                out[f"{prefix}{e}.{name}.weight"] = shape
        return out

    def load_checkpoint_tensor(
        self,
        rest: str,
        tensor: torch.Tensor,
        device: torch.device,
        dtype: torch.dtype,
        alloc: Callable[[torch.Size, torch.dtype, torch.device], torch.Tensor] | None = None,
    ) -> bool:
        """rest: "{e}.{name}.weight". Allocates the stacked parameter on first use (with `alloc`(shape, dtype,
        device) when given: the quantizing loader recycles a packed layer's stacks), then fills row e. Returns True
        when this call completed the layer (every expert's gate, up and down has arrived)."""
        e_str, name, _ = rest.split(".")
        if self.packed is not None:
            raise ValueError(f"expert tensor {rest} arrived after the layer was packed")
        stacked = getattr(self, name)
        if stacked.is_meta:
            data = (alloc or _empty)(stacked.shape, dtype, device)
            stacked = nn.Parameter(data, requires_grad=False)
            self.register_parameter(name, stacked)
        stacked.data[int(e_str)].copy_(tensor)
        self._filled.add((int(e_str), name))
        return self.complete

    @property
    def complete(self) -> bool:
        """Whether every expert's weights are here: packed, or all 3 E rows of the stacks loaded."""
        return self.packed is not None or len(self._filled) == 3 * self.num_experts

    # --- storage: plain stacked parameters, or packed int8 / int4 tiles ------------------------------------------

    @property
    def plain_math(self) -> bool:
        """Whether each expert is act(gate x) * (up x) through down with no biases: what the fused CPU and GPU
        kernels compute. Other experts (gpt-oss's clamped, biased ones) take PyTorch's path everywhere."""
        from cadenza.kernels.cpu_moe import ACT_CODES

        return not self.bias and self.hidden_act in ACT_CODES

    @property
    def kernel_math(self) -> bool:
        """Whether the CPU kernel and the packed layouts' GPU kernels compute these experts: plain ones, and
        gpt-oss's (biases, clamped SwiGLU)."""
        from cadenza.kernels.cpu_moe import kernel_act

        return kernel_act(self.hidden_act) is not None

    def kernel_biases(self) -> tuple[torch.Tensor, ...] | None:
        """(gate, up, down) biases as fp32 host tensors for the CPU kernel (made once), or None without biases."""
        if not self.bias:
            return None
        if getattr(self, "_kernel_biases", None) is None:
            names = ("gate_bias", "up_bias", "down_bias")
            self._kernel_biases = tuple(getattr(self, n).detach().float().cpu().contiguous() for n in names)
        return self._kernel_biases

    def weight_names(self) -> tuple[str, ...]:
        """The stacked parameters holding the weights (the biases left out)."""
        names = self.stack_names()
        return names[:-3] if self.bias else names

    @property
    def expert_format(self) -> str:
        """How the experts are stored: "bf16" (plain stacked parameters, in the compute dtype), "int8" or "int4"."""
        return "bf16" if self.packed is None else self.packed.fmt

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert as stored (packed: weights, scales and padding, what a use of it reads)."""
        if self.packed is not None:
            return self.packed.expert_bytes + self._bias_nbytes(self.gate_bias.dtype if self.bias else None)
        return sum(w.numel() * w.element_size() for w in self.weights_of(0))

    def expert_nbytes_as(self, fmt: str, group: int | None = None, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes one expert of this layer takes stored as `fmt`: "bf16" plain in `dtype`, "int8" / "int4" packed
        with scale group `group` (None: the format's default). From shapes alone (works on the meta model)."""
        if fmt == "bf16":
            return self.num_parameters // self.num_experts * torch.empty((), dtype=dtype).element_size()
        return layout.expert_nbytes(fmt, group, self.hidden_size, self.intermediate_size) + self._bias_nbytes(dtype)

    def _bias_nbytes(self, dtype: torch.dtype | None) -> int:
        """One expert's biases in `dtype` (they stay beside packed weights); 0 without biases."""
        if not self.bias:
            return 0
        return (2 * self.intermediate_size + self.hidden_size) * torch.empty((), dtype=dtype).element_size()

    @property
    def num_parameters(self) -> int:
        """Weights of all experts of the layer (gate, up and down, and biases), however they are stored."""
        biases = (2 * self.intermediate_size + self.hidden_size) if self.bias else 0
        return self.num_experts * (3 * self.hidden_size * self.intermediate_size + biases)

    def host_weights(self, e: int) -> tuple[torch.Tensor, ...]:
        """The tensors that hold expert e: plain (gate [I, H], up [I, H], down [H, I]); packed (gate_up tiles
        [Ip / 2, tile bytes], down tiles [Hp / 4, tile bytes], uint8)."""
        if self.packed is not None:
            biases = (self.gate_bias[e], self.up_bias[e], self.down_bias[e]) if self.bias else ()
            return self.packed.gate_up[e], self.packed.down[e], *biases
        return self.weights_of(e)

    def quantize(self, fmt: str, group: int | None = None, threads: int | None = None) -> None:
        """Packs the loaded stacked experts (CPU) as `fmt` ("int8", "int4"; "bf16" keeps them plain: nothing to do)
        with `threads` threads (default: physical cores), then frees the stacks (`set_packed`)."""
        if fmt == "bf16":
            return
        if self.packed is not None:
            raise ValueError(f"the experts are already packed as {self.packed.fmt}")
        mats = (self.gate, self.up, self.down)
        if not self.complete or any(w.is_meta for w in mats):
            raise ValueError("the experts are not loaded yet: load every expert's weights before quantizing")
        if any(w.device.type != "cpu" for w in mats):
            raise CadenzaError(f"Quantized experts are packed in host memory; these are on {self.gate.device}.")
        self._check_act()
        if threads is None:
            from cadenza.moe.cpu import physical_cores

            threads = physical_cores()
        self.set_packed(layout.pack_layer(*mats, fmt, group, threads=threads))

    def set_packed(self, packed: PackedExperts, dtype: torch.dtype | None = None) -> None:
        """Makes `packed` this layer's storage and drops the stacked parameters: they become meta tensors of the
        same shapes, in `dtype` (default: theirs), holding no memory."""
        if (packed.num_experts, packed.hidden, packed.intermediate) != (
            self.num_experts,
            self.hidden_size,
            self.intermediate_size,
        ):
            raise ValueError(
                f"packed experts of shape {(packed.num_experts, packed.hidden, packed.intermediate)} do not fit "
                f"this layer's {(self.num_experts, self.hidden_size, self.intermediate_size)} (E, H, I)"
            )
        self._check_act()
        self.packed = packed
        for name in self.weight_names():
            old = getattr(self, name)
            meta = torch.empty(old.shape, dtype=dtype or old.dtype, device="meta")
            self.register_parameter(name, nn.Parameter(meta, requires_grad=False))
        self._filled.clear()

    def loaded(self, on_host: bool) -> None:
        """Called once the checkpoint's tensors are all read (`on_host`: the experts live in host memory): a family
        whose stored form the kernels do not read as it is puts it into their layout here (gpt-oss's MXFP4)."""

    def _check_act(self) -> None:
        from cadenza.kernels.cpu_moe import ACT_CODES

        if not self.kernel_math:
            what = f"the activation {self.hidden_act!r}"
            raise CadenzaError(
                f"Quantized experts need what the CPU kernel computes ({', '.join(ACT_CODES)} or gpt-oss's clamped "
                "SwiGLU); "
                f"this model has {what}. Run it with experts='bf16' (--experts bf16)."
            )

    # The layer's offloaded executor (cadenza.moe.offload.layer.LayerOffload), attached by the Orchestra that owns
    # it and detached by its close(); None: every expert's weights are in this module's parameters.
    offload = None

    def forward(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        shared: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [T, H], topk_ids / topk_weights [T, k] -> sum of the routed experts' weighted outputs [T, H], plus
        `shared()` ([T, H]: the family's always-on experts) when given."""
        if self.offload is not None:
            return self.offload(x, topk_ids, topk_weights, shared)
        if self.packed is not None:
            y = self._packed_forward(x, topk_ids, topk_weights)
            return y if shared is None else y + shared()
        counts = torch.bincount(topk_ids.reshape(-1), minlength=self.num_experts).tolist()  # one host sync
        y = torch.zeros_like(x)
        order = expert_order(topk_ids)
        active = [e for e, n in enumerate(counts) if n]
        run_experts(x, topk_ids.shape[1], topk_weights, order, counts, active, self.weights_of, self.glu, y)
        return y if shared is None else y + shared()

    def _packed_forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """The packed experts in host memory, computed by the fused CPU kernel: x [T, H] on the CPU -> y [T, H]."""
        if x.device.type != "cpu":
            raise CadenzaError(
                f"This model's routed experts are packed as {self.packed.fmt} in host memory, but it runs on "
                f"{x.device} without offloading. Run it on device='cpu', or on a GPU through the offloading path "
                "(which computes host experts on the CPU), or use experts='bf16'."
            )
        from cadenza.kernels import cpu_moe

        counts = torch.bincount(topk_ids.reshape(-1), minlength=self.num_experts)
        active = torch.nonzero(counts).view(-1).tolist()
        y = cpu_moe.moe_forward(
            self.packed, x, topk_ids, topk_weights, active, self.hidden_act, torch.get_num_threads(),
            biases=self.kernel_biases(), activations=getattr(self, "cpu_activations", None),
        )  # float32  # fmt: skip
        return y.to(x.dtype)

    def stack_names(self) -> tuple[str, ...]:
        """The stacked parameters that hold every expert (expert e is row e of each), in `expert_ffn`'s order:
        gate, up, down, then (with biases) gate_bias, up_bias, down_bias."""
        names = (self.gate_name, self.up_name, self.down_name)
        return names + ("gate_bias", "up_bias", "down_bias") if self.bias else names

    def stacks(self) -> list[torch.Tensor]:
        return [getattr(self, n) for n in self.stack_names()]

    def weights_of(self, e: int) -> tuple[torch.Tensor, ...]:
        """Expert e's plain tensors (`stack_names`' order), as `expert_ffn` takes them."""
        return tuple(getattr(self, n)[e] for n in self.stack_names())


def _empty(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def expert_order(topk_ids: torch.Tensor) -> torch.Tensor:
    """(token, slot) pairs [T*k] grouped by expert id; with per-expert counts from the host, expert e's pairs are
    order[offset_e : offset_e + count_e], sliced without a device sync."""
    return torch.argsort(topk_ids.reshape(-1), stable=True)


def offsets(counts: list[int]) -> list[int]:
    out, acc = [], 0
    for n in counts:
        out.append(acc)
        acc += n
    return out


def each_expert(order: torch.Tensor, counts: list[int], experts, k: int):
    """The one walk over a layer's experts: for each e of `experts`, (e, pairs, tokens) where pairs are its (token,
    slot) pairs (positions in the flattened [T, k] routing) and tokens their rows of x; order from `expert_order`,
    counts [E] on the host (slices, no device sync)."""
    starts = offsets(counts)
    for e in experts:
        pairs = order[starts[e] : starts[e] + counts[e]]
        yield e, pairs, pairs // k


def run_experts(
    x: torch.Tensor,
    k: int,
    topk_weights: torch.Tensor,
    order: torch.Tensor,
    counts: list[int],
    experts: list[int],
    weights_of,
    glu,
    y: torch.Tensor,
) -> None:
    """y += sum over the given experts of weight * expert_e(x) for the tokens routed to them.

    x, y [T, H]; topk_weights [T, k]; order from `expert_order`; counts [E] on the host; weights_of(e) -> (gate
    [I, H], up [I, H], down [H, I][, gate_bias [I], up_bias [I], down_bias [H]]) wherever expert e's weights are (a
    resident row, a fetched slot, host memory); glu(gate_out, up_out) -> h (`glu_fn`).
    """
    flat_w = topk_weights.reshape(-1)
    for e, pairs, tokens in each_expert(order, counts, experts, k):
        ye = expert_ffn(x[tokens], weights_of(e), glu) * flat_w[pairs, None]  # float32 through the routing weight
        y.index_add_(0, tokens, ye.to(y.dtype))


def expert_ffn(xe: torch.Tensor, weights: tuple[torch.Tensor, ...], glu) -> torch.Tensor:
    """One expert on its tokens xe [n, H] -> [n, H]: weights (gate, up, down[, biases]) as `run_experts` takes;
    nine tensors are MXFP4 experts (blocks and scales of gate, up, down, then the biases), dequantized for this use."""
    if len(weights) == 9:
        from cadenza.models.mxfp4 import dequantize_mxfp4

        mats = [dequantize_mxfp4(weights[j], weights[j + 1], xe.dtype) for j in (0, 2, 4)]
        weights = (*mats, *weights[6:])
    if len(weights) == 6:
        gate, up, down, b_gate, b_up, b_down = weights
        return glu(xe @ gate.T + b_gate, xe @ up.T + b_up) @ down.T + b_down
    gate, up, down = weights
    return glu(xe @ gate.T, xe @ up.T) @ down.T
