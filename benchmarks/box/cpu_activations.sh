# The CPU kernel with exact against int8 activations (cadenza.bench.cpu_kernel --activations exact,int8) on one
# layer of each model, at one and four tokens, 16 threads, prefetch 0 / 2048: what decides `--cpu-activations auto`
# (FORMATS default: the K-quant pair and the two int8 formats that auto leaves exact until measured). ~3 minutes.
source benchmarks/box/setup.sh
for m in ${MODELS:-mixtral-8x7b qwen3-30b-a3b}; do
  timeout 280 python3 -m cadenza.bench.cpu_kernel --model "$m" --formats "${FORMATS:-q4_k+q6_k,q8_0,int8}" \
    --activations exact,int8 --tokens 1,4 --seconds 1 --layouts tiled --prefill-tokens 0 --no-torch \
    --thread-sweep 16 --prefetch 0,2048 --dram-gib 2 --out "$OUT/cpu-activations-$m.json" > "$OUT/cpu-activations-$m.log" 2>&1
  echo "$m rc=$?"; grep -E " kernel |error" "$OUT/cpu-activations-$m.log" | tail -20
done
