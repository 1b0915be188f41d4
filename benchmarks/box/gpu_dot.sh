# The block loops' two accumulations (CADENZA_GPU_DOT: reduce, the default; acc4, the candidate with no cross-lane
# sums inside the loop) timed on the experts' decode kernels (cadenza.bench.gpu_kernel: Mixtral's and Qwen3's
# shapes, q4_k+q6_k and q4_0, 1 and 4 tokens, every block configuration) and on the dense layers' (linear_split.py).
# Writes $OUT/gpu-dot.txt (the default configuration's microseconds side by side) and $OUT/gpu-dot-verdict.sh
# (exports the faster where it wins by 3% summed over the cases). G1=1: then G1 with the verdict, llama.cpp beside
# (TRIALS, default 1; needs llama-bench: tests.sh first). ~4 minutes; with G1 ~7.
source benchmarks/box/setup.sh
for d in reduce acc4; do
  CADENZA_GPU_DOT=$d timeout 200 python3 -m cadenza.bench.gpu_kernel --shapes mixtral,qwen3 --formats q4_k+q6_k,q4_0 \
    --tokens 1,4 --prefill-tokens 0 --out "$OUT/gpu-dot-$d.json" > "$OUT/gpu-dot-$d.log" 2>&1
  CADENZA_GPU_DOT=$d timeout 60 python3 benchmarks/box/linear_split.py > "$OUT/linear-$d.txt" 2>&1
done
python3 - <<'EOF'
import json, os
out = os.environ["OUT"]
rows, total = {}, {}
for d in ("reduce", "acc4"):
    try:
        decode = json.load(open(f"{out}/gpu-dot-{d}.json"))["decode"]
    except (OSError, KeyError, ValueError) as e:
        print(f"{d}: no results ({e})")
        continue
    cases = {}
    for r in decode:
        cases.setdefault((r["shape"], r["format"], r["tokens"]), []).append(r)
    for case, rs in cases.items():  # the default configuration's time (where none is marked: the fastest)
        marked = [r["us"] for r in rs if r.get("default")]
        rows.setdefault(case, {})[d] = marked[0] if marked else min(r["us"] for r in rs)
lines = [f"{'shape':8s} {'format':10s} {'tokens':>6s} {'reduce us':>10s} {'acc4 us':>9s}"]
for (shape, fmt, n), v in sorted(rows.items()):
    lines.append(f"{shape:8s} {fmt:10s} {n:6d} {v.get('reduce', float('nan')):10.1f} {v.get('acc4', float('nan')):9.1f}")
    for d, us in v.items():
        total[d] = total.get(d, 0.0) + us
for d in ("reduce", "acc4"):
    try:
        lines.append(f"linear_split {d}: " + open(f"{out}/linear-{d}.txt").read().strip().splitlines()[-2])
    except (OSError, IndexError):
        pass
pick = "acc4" if len(total) == 2 and total["acc4"] < 0.97 * total["reduce"] else "reduce"
lines.append(f"summed: {total}; verdict: {pick}")
print("\n".join(lines))
open(f"{out}/gpu-dot.txt", "w").write("\n".join(lines) + "\n")
open(f"{out}/gpu-dot-verdict.sh", "w").write(f"export CADENZA_GPU_DOT={pick}\n")
EOF
if [ -n "${G1:-}" ]; then
  source "$OUT/gpu-dot-verdict.sh"
  echo "G1 with CADENZA_GPU_DOT=$CADENZA_GPU_DOT"
  TRIALS=${TRIALS:-1} bash benchmarks/box/gguf.sh G1 "dot-$CADENZA_GPU_DOT"
fi
