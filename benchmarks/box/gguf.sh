# Call 2 / 3: scenario $1 (G1, G2) with llama.cpp's rows in the same JSON; $2: a tag for a variant's files;
# BENCH_FLAGS: more `cadenza bench` flags (BENCH_FLAGS=--profile-step: where one decode step's milliseconds go).
source benchmarks/box/setup.sh
bench=.peers/llama.cpp/build/bin/llama-bench
[ -x "$bench" ] || { echo "no llama-bench at $bench: run benchmarks/box/tests.sh first on this machine"; exit 1; }
tag=${2:+--tag $2}
python3 -m cadenza bench --scenario "$1" --trials "${TRIALS:-3}" --peer "llama.cpp=$bench" --peer-dir /dev/shm --out "$OUT" $tag ${BENCH_FLAGS:-} \
  > "$OUT/$1${2:+-$2}.log" 2>&1
echo "rc=$?"
grep -v "moving\|GGUF: layer" "$OUT/$1${2:+-$2}.log" | tail -30
