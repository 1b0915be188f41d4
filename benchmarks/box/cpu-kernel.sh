# The CPU kernel on Mixtral's GGUF formats at one and four tokens (16 threads), then one thread's in-cache rate.
source benchmarks/box/setup.sh
python3 -m cadenza.bench.cpu_kernel --model mixtral-8x7b --formats q4_k+q6_k,q4_k,q6_k,q5_k,int4 --tokens 1,4 \
  --seconds 2 --layouts tiled --prefill-tokens 0 --no-torch --out "$OUT/cpu-kernel-blocks-mixtral.json" \
  > "$OUT/cpu-kernel.log" 2>&1
tail -8 "$OUT/cpu-kernel.log"
python3 -m cadenza.bench.cpu_kernel --model qwen3-30b-a3b --formats q4_k,q6_k,q5_k,int4 --tokens 1 --seconds 1 \
  --layouts tiled --prefill-tokens 0 --no-torch --threads 1 --in-cache --out "$OUT/cpu-kernel-in-cache.json" \
  > "$OUT/cpu-kernel-in-cache.log" 2>&1
tail -6 "$OUT/cpu-kernel-in-cache.log"
