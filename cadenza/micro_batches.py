"""A decode step's batch as micro-batches in threads, so the CPU's and the GPU's work of different rows overlap.

With the KV cache in host memory (`--kv-cache host`) a layer's attention runs on the CPU and its experts on the GPU
(or fetched to it), one after the other for the whole batch: the GPU waits while the CPU attends and the CPU waits
while the GPU computes. Split into micro-batches, each decoded by its own thread on its own CUDA stream, one
micro-batch's attention on the CPU runs while another's experts run on the GPU (MoE-Lightning's CGOPipe, in its
simplest form). The rows share the cache (each thread writes its own rows; the cache is grown first, so no thread
reallocates it) and the offloaded layers (one layer call at a time, finished on its stream before the next: the
Orchestra's lock); everything else a layer does belongs to its thread's stream.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait

import torch
from torch.profiler import record_function

MIN_ROWS = 8  # per micro-batch: fewer rows are not worth a thread's handoff
SPAN = "cadenza.microbatch"  # each thread's step, on a timeline (cadenza.bench.timeline)


class MicroBatches:
    def __init__(self, count: int, device: torch.device, orchestra=None):
        self.count, self.device, self.orchestra = count, device, orchestra
        self.cuda = device.type == "cuda"
        self.streams = [torch.cuda.Stream(device) for _ in range(count)] if self.cuda and count > 1 else []
        self.pool = ThreadPoolExecutor(count, thread_name_prefix="cadenza-mb") if count > 1 else None

    def applies(self, rows: int) -> bool:
        return self.pool is not None and rows >= self.count * MIN_ROWS

    def split(self, lengths: list[int]) -> list[list[int]]:
        """The rows' indices per micro-batch, balanced by the cache each reads (a step's attention reads every
        row's whole cache): longest first, each to the micro-batch with the least so far, as even in count as
        possible; each micro-batch's indices in their order."""
        n, k = len(lengths), self.count
        cap = [n // k + (i < n % k) for i in range(k)]
        parts: list[list[int]] = [[] for _ in range(k)]
        load = [0] * k
        for i in sorted(range(n), key=lambda i: -lengths[i]):
            j = min((j for j in range(k) if len(parts[j]) < cap[j]), key=lambda j: load[j])
            parts[j].append(i)
            load[j] += lengths[i] + 1
        return [sorted(p) for p in parts]

    def decode(self, model, token_ids: list[int], cache, rows: list[int]) -> torch.Tensor:
        """One decode step of `rows` as `count` micro-batches -> logits [B, V], in the rows' order."""
        groups = self.split([cache.lengths[r] for r in rows])
        parts = [([token_ids[i] for i in g], [rows[i] for i in g]) for g in groups]
        cache.ensure(max(cache.lengths[r] for r in rows) + 1)  # grown here, never inside a thread
        main = torch.cuda.current_stream(self.device) if self.cuda else None

        def run(i: int) -> torch.Tensor:
            ids_i, rows_i = parts[i]
            with torch.inference_mode(), record_function(f"{SPAN}.{i}"):  # (inference mode is per thread)
                ids = torch.tensor([[t] for t in ids_i], dtype=torch.long, device=self.device)
                if not self.cuda:
                    return model(ids, cache, last_only=True, rows=rows_i)[:, -1]
                stream = self.streams[i]
                stream.wait_stream(main)
                # (a thread starts on device 0: the current device, like the current stream, is per thread)
                with torch.cuda.device(self.device), torch.cuda.stream(stream):
                    return model(ids, cache, last_only=True, rows=rows_i)[:, -1]

        orch = self.orchestra
        if orch is not None:
            orch.concurrent = True
        try:
            futures = [self.pool.submit(run, i) for i in range(self.count)]
            wait(futures)  # all of them, before the first failure is raised and the layers are shared again
            outs = [f.result() for f in futures]
        finally:
            if orch is not None:
                orch.concurrent = False
        if self.cuda:
            for s in self.streams:
                main.wait_stream(s)
        logits = torch.cat(outs)
        order = torch.tensor([i for g in groups for i in g], device=logits.device)
        return torch.empty_like(logits).index_copy_(0, order, logits)  # back in the rows' order

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
