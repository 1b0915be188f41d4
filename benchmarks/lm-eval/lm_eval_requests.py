# lm-eval's own encoding of each logged request, and the log-likelihood it got from cadenza serve
import glob, json, sys
from lm_eval.models.openai_completions import LocalCompletionsAPI

demo = sys.argv[1]
lm = LocalCompletionsAPI(
    model="demo", base_url="http://127.0.0.1:8011/v1/completions", tokenizer_backend="huggingface", tokenizer=demo
)
out = []
for f in glob.glob("benchmarks/lm-eval/out/**/samples_cadenza_mc*.jsonl", recursive=True):
    for line in open(f):
        s = json.loads(line)
        for args, resp in zip(s["arguments"].values(), s["resps"]):
            ctx, cont = args["arg_0"], args["arg_1"]
            c, k = lm._encode_pair(ctx, cont)
            out.append({"context": c, "continuation": k, "loglik": float(resp[0][0]), "greedy": resp[0][1] == "True"})
json.dump(out, open("benchmarks/lm-eval/enc.json", "w"))
print(len(out), "requests")
