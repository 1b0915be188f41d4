"""Host memory the GPU reads and writes: page-locked expert weights, the token embedding table, and the staging of
a layer's routing.

Every routed expert lives once in host memory, page-locked in place so a fetch is a DMA copy; the token embedding
table is page-locked and read by the GPU through its mapping (`embedding_to_host`); the host-deciding path reads one
layer's hidden states, ids and weights back into pinned buffers with one synchronisation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


def available_host_bytes() -> int:
    """Host memory the kernel says is available now (MemAvailable: free plus reclaimable page cache); 0 where it
    cannot be read (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pin_host_memory(t: torch.Tensor) -> bool:
    """Page-locks a CPU tensor in place (cudaHostRegister), so copies from it are DMA and need no staging copy.
    Unlike `pin_memory()`, this neither copies nor rounds the allocation up to a power of two. The caller must
    `unpin_host_memory` it before the memory is freed (else a later allocation at the same address fails to
    register)."""
    if not torch.cuda.is_available():
        return False
    cudart = torch.cuda.cudart()
    # portable (1): pinned for every GPU's context, not only the current one's (layers split over several GPUs)
    err = cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 1)
    if int(err) != 0:
        cudart.cudaGetLastError()  # clear the sticky error, or the next kernel launch reports it
        return False
    return True


def unpin_host_memory(t: torch.Tensor) -> None:
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostUnregister(t.data_ptr())) != 0:
        cudart.cudaGetLastError()


class PinnedWeights:
    """The page-locked host tensors of every offloaded layer, unpinned by `release` (idempotent)."""

    def __init__(self, tensors: list[torch.Tensor], device: torch.device):
        self.device = device
        self.registered = [w for w in tensors if pin_host_memory(w)]
        self.complete = len(self.registered) == len(tensors)

    def release(self) -> None:
        if self.registered:
            torch.cuda.synchronize(self.device)  # no copy may still read the memory
            for w in self.registered:
                unpin_host_memory(w)
            self.registered = []


def embedding_to_host(model, device: torch.device) -> tuple[PinnedWeights | None, str | None]:
    """The token embedding table, loaded into host memory (`loader.embedding_on_host`), copied into an allocation
    of its own (a loaded tensor may be a view of a read-only file mapping), page-locked in place and put back into
    the model as a CUDA tensor of `device` aliasing it through its device mapping: the embedding's gather reads the
    rows a step looks up over the link, inside CUDA graphs too. Returns (the pinned table, None), or where the
    mapping cannot be had (None, why) with the table moved to `device` instead."""
    from torch import nn

    from cadenza.kernels import handoff

    emb = model.model.embed_tokens
    table = torch.empty(emb.weight.shape, dtype=emb.weight.dtype).copy_(emb.weight)
    pinned = PinnedWeights([table], device)
    ops, view, why = handoff.memops(), None, None
    if not pinned.complete:
        why = "the table could not be page-locked"
    elif ops is None:
        why = "the CUDA driver's cuMemHostGetDevicePointer was not found"
    else:
        try:
            view = handoff.device_view(ops, table, device)
        except (RuntimeError, AttributeError) as e:
            why = f"the table could not be mapped for the GPU ({e})"
    if view is None:
        pinned.release()
        emb.weight = nn.Parameter(table.to(device), requires_grad=False)
        return None, why
    emb.weight = nn.Parameter(view, requires_grad=False)
    emb.host_table = table  # the memory the view reads, alive as long as the model
    return pinned, None


@dataclass
class Staging:
    """Pinned host buffers for one layer's hidden states, ids and weights going to the host."""

    x: torch.Tensor
    ids: torch.Tensor
    w: torch.Tensor
    guess: torch.Tensor | None = None


class ToHost:
    """The host-deciding layer's one GPU->host synchronisation: hidden states, ids and weights (and the prefetch
    guess) land in pinned buffers, reused while their shape fits."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.staging: Staging | None = None
        self.event = torch.cuda.Event() if cuda else None

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, guess: torch.Tensor | None, counters):
        counters.syncs += 1
        if not self.cuda:
            return x, ids, w, guess
        t = x.shape[0]
        s = self.staging
        if s is None or s.x.shape[0] < t or s.x.dtype != x.dtype or s.ids.shape[1] != ids.shape[1]:
            n = max(t, 1)
            s = self.staging = Staging(
                torch.empty(n, x.shape[1], dtype=x.dtype, pin_memory=True),
                torch.empty(n, ids.shape[1], dtype=ids.dtype, pin_memory=True),
                torch.empty(n, w.shape[1], dtype=w.dtype, pin_memory=True),
            )
        x_h, ids_h, w_h = s.x[:t], s.ids[:t], s.w[:t]
        x_h.copy_(x, non_blocking=True)
        ids_h.copy_(ids, non_blocking=True)
        w_h.copy_(w, non_blocking=True)
        guess_h = None
        if guess is not None:
            if s.guess is None or s.guess.shape[0] < t or s.guess.shape[1] != guess.shape[1]:
                s.guess = torch.empty(max(t, 1), guess.shape[1], dtype=guess.dtype, pin_memory=True)
            guess_h = s.guess[:t]
            guess_h.copy_(guess, non_blocking=True)
        self.event.record()
        t0 = time.perf_counter()
        self.event.synchronize()
        counters.sync_wait_s += time.perf_counter() - t0
        return x_h, ids_h, w_h, guess_h
