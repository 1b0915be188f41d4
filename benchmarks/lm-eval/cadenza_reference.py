# the same log-likelihoods from cadenza's Python API (LLM.score's log-softmax), no server
import json, sys, torch
from cadenza import LLM

llm = LLM(sys.argv[1], device="cpu", dtype="float32")
worst = 0.0
reqs = json.load(open("benchmarks/lm-eval/enc.json"))
for r in reqs:
    ids = r["context"] + r["continuation"]
    lp = torch.log_softmax(llm.score(ids).double(), -1)
    n = len(r["continuation"])
    pos = range(len(ids) - n, len(ids))
    want = sum(lp[p - 1, ids[p]].item() for p in pos)
    greedy = all(lp[p - 1].argmax().item() == ids[p] for p in pos)
    worst = max(worst, abs(want - r["loglik"]))
    assert greedy == r["greedy"], r
print(f"{len(reqs)} requests: largest |lm-eval's loglik - LLM.score's| = {worst:.2e}")
