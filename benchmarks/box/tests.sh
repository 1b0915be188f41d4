# Call 1 (`tests.sh kernels`: the kernel tests alone, see below): llama.cpp's peers (llama-bench, llama-batched-bench) ready, `pytest -m gpu` meanwhile; logs in $OUT.
# PROBE=1: then benchmarks/box/pack_speed.py (~1-2 minutes: why int4 loads pack slowly here).
# The peers: .peers/llama-prebuilt.tar.xz (benchmarks/box/prebuild-llama.sh, built on the development machine) where
# it runs here (it lists the GPU), else built from source in the background (~5 min of the call).
source benchmarks/box/setup.sh
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
lscpu | grep -iE "numa|model name|mhz|socket|flags" | tee "$OUT/lscpu.txt" | grep -v -i flags
bin=.peers/llama.cpp/build/bin
prebuilt=no
if [ -f .peers/llama-prebuilt.tar.xz ]; then
  mkdir -p .peers/llama.cpp/build && tar xJf .peers/llama-prebuilt.tar.xz -C .peers/llama.cpp/build
  "$bin/llama-bench" --list-devices > "$OUT/prebuilt.log" 2>&1 && grep -q CUDA0 "$OUT/prebuilt.log" && prebuilt=yes
fi
echo "prebuilt peers: $prebuilt" | tee "$OUT/build.log"
if [ $prebuilt = no ] && [ "${1:-marked}" != kernels ]; then
  # niced: session 22's build at full priority beside the tests left pytest cut at ~139 of 178 tests by its timeout
  (nice -n 19 bash .peers/build-llama-bench.sh .peers/llama.cpp-src.tar.xz .peers >> "$OUT/build.log" 2>&1 \
    && nice -n 19 cmake --build .peers/llama.cpp/build --target llama-batched-bench -j 8 >> "$OUT/build.log" 2>&1
   echo "build-rc=$?" >> "$OUT/build.log") &
fi
if [ "${1:-marked}" != kernels ]; then
  timeout 480 python3 -m pytest -m gpu -q -rfE --tb=short -p no:cacheprovider tests > "$OUT/gpu-tests.log" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu-tests.log" | tail -20
fi
# `tests.sh kernels` (a call of its own, ~3-5 min): the Triton kernels' own tests, which carry no gpu mark (on a
# machine without CUDA they run under Triton's interpreter), compiled on the GPU
if [ "${1:-marked}" = kernels ]; then
  timeout 480 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/kernels/test_gpu_fused.py \
    tests/kernels/test_gpu_linear.py tests/kernels/test_gpu_routing.py tests/kernels/test_gpu_moe.py \
    tests/kernels/test_gpu_grouped.py > "$OUT/gpu-kernel-tests.log" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu-kernel-tests.log" | tail -20
fi
wait
tail -2 "$OUT/build.log"
if [ -n "${PROBE:-}" ]; then timeout 240 python3 benchmarks/box/pack_speed.py > "$OUT/pack-speed.log" 2>&1; tail -12 "$OUT/pack-speed.log"; fi
