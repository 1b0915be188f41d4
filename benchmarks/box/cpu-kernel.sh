# The CPU kernel on Mixtral's GGUF formats at one and four tokens (16 threads); then, at one token, the kernel and a
# plain read of the same tiles (no arithmetic: memory's rate for these bytes) at 1-16 threads; then one thread on
# Qwen3's 8 small experts, the same experts every call.
source benchmarks/box/setup.sh
python3 -m cadenza.bench.cpu_kernel --model mixtral-8x7b --formats q4_k+q6_k,q4_k,q6_k,q5_k,int4 --tokens 1,4 \
  --seconds 2 --layouts tiled --prefill-tokens 0 --no-torch --out "$OUT/cpu-kernel-blocks-mixtral.json" \
  > "$OUT/cpu-kernel.log" 2>&1
tail -8 "$OUT/cpu-kernel.log"
# (software prefetch distances too: if reads and arithmetic add up rather than overlap, a farther prefetch may help)
python3 -m cadenza.bench.cpu_kernel --model mixtral-8x7b --formats q4_k+q6_k --tokens 1 --seconds 1 --layouts tiled \
  --prefill-tokens 0 --no-torch --prefetch 0,1024,4096,16384 --thread-sweep 1,2,4,8,12,16 \
  --out "$OUT/cpu-kernel-sweep-mixtral.json" \
  > "$OUT/cpu-kernel-sweep.log" 2>&1
grep -E "kernel|read" "$OUT/cpu-kernel-sweep.log" | tail -14
python3 -m cadenza.bench.cpu_kernel --model qwen3-30b-a3b --formats q4_k,q6_k,q5_k,int4 --tokens 1 --seconds 1 \
  --layouts tiled --prefill-tokens 0 --no-torch --threads 1 --in-cache --out "$OUT/cpu-kernel-in-cache.json" \
  > "$OUT/cpu-kernel-in-cache.log" 2>&1
tail -6 "$OUT/cpu-kernel-in-cache.log"
