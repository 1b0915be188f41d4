"""lm-eval's own encoding of each logged multiple-choice request, and the log-likelihood it got from cadenza serve
(run in lm-eval's environment; argument: the model folder, for its tokenizer)."""

import glob
import json
import sys
from pathlib import Path

from lm_eval.models.openai_completions import LocalCompletionsAPI

HERE = Path(__file__).parent
URL = "http://127.0.0.1:8011/v1/completions"
lm = LocalCompletionsAPI(model="demo", base_url=URL, tokenizer_backend="huggingface", tokenizer=sys.argv[1])
out = []
for name in glob.glob(str(HERE / "out" / "**" / "samples_cadenza_mc*.jsonl"), recursive=True):
    for line in Path(name).read_text().splitlines():
        sample = json.loads(line)
        for args, resp in zip(sample["arguments"].values(), sample["resps"], strict=True):
            context, continuation = lm._encode_pair(args["arg_0"], args["arg_1"])
            loglik, greedy = float(resp[0][0]), resp[0][1] == "True"
            out.append({"context": context, "continuation": continuation, "loglik": loglik, "greedy": greedy})
(HERE / "out" / "requests.json").write_text(json.dumps(out))
print(len(out), "requests")
