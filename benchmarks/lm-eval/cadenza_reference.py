"""The same log-likelihoods from cadenza's Python API (LLM.score's log-softmax), no server, compared with lm-eval's
(argument: the model folder)."""

import json
import sys
from pathlib import Path

import torch

from cadenza import LLM

llm = LLM(sys.argv[1], device="cpu", dtype="float32")
worst = 0.0
requests = json.loads((Path(__file__).parent / "out" / "requests.json").read_text())
for r in requests:
    ids = r["context"] + r["continuation"]
    lp = torch.log_softmax(llm.score(ids).double(), -1)
    positions = range(len(ids) - len(r["continuation"]), len(ids))
    want = sum(lp[p - 1, ids[p]].item() for p in positions)
    greedy = all(lp[p - 1].argmax().item() == ids[p] for p in positions)
    worst = max(worst, abs(want - r["loglik"]))
    assert greedy == r["greedy"], r
print(f"{len(requests)} requests: largest |lm-eval's loglik - LLM.score's| = {worst:.2e}")
