# Call 1: llama-bench built in the background (~5 min), `pytest -m gpu` meanwhile; both logs in $OUT.
source benchmarks/box/setup.sh
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
lscpu | grep -iE "numa|model name|mhz|socket" | tee "$OUT/lscpu.txt"
# (then llama-batched-bench from the same configured tree: T1 / T2's peer)
(bash .peers/build-llama-bench.sh .peers/llama.cpp-src.tar.xz .peers > "$OUT/build.log" 2>&1 \
  && cmake --build .peers/llama.cpp/build --target llama-batched-bench -j 8 >> "$OUT/build.log" 2>&1
 echo "build-rc=$?" >> "$OUT/build.log") &
build=$!
timeout 450 python3 -m pytest -m gpu -q -rfE --tb=short -p no:cacheprovider tests > "$OUT/gpu-tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu-tests.log" | tail -20
wait $build
tail -2 "$OUT/build.log"
