# #22's T1 (synthetic Mixtral-8x7B, 24 GiB) with int4 experts: the offline job with the KV cache on the GPU, then on
# the host (attention on the CPU). PROMPTS=N (default 1024), EXPERTS=bf16 for the other row set, RUNS=gpu,host,host2
# (a subset; none: the peer alone), NO_PEER=1. 128 prompts, all three rows and the peer did not fit one call
# (2026-12-03): split them, e.g. RUNS=gpu,host NO_PEER=1, then RUNS=host2 NO_PEER=1, then RUNS=none. ~2.5 minutes to build int4 Mixtral, then the two jobs.
# With int4 experts, llama-batched-bench (built by tests.sh) runs after cadenza on the same model as a Q4_0 GGUF.
source benchmarks/box/setup.sh
peer=.peers/llama.cpp/build/bin/llama-batched-bench
if [ ! -x "$peer" ] && [ -f .peers/llama-prebuilt.tar.xz ]; then  # a call without tests.sh before it (carry
  mkdir -p .peers/llama.cpp/build && tar xJf .peers/llama-prebuilt.tar.xz -C .peers/llama.cpp/build  # replaces .peers)
fi
args=()
[ "${EXPERTS:-int4}" = int4 ] && [ -x "$peer" ] && [ -z "${NO_PEER:-}" ] && args=(--peer "llama.cpp=$peer" --peer-dir /dev/shm)
[ -n "${RUNS:-}" ] && args+=(--runs "$RUNS")  # gpu,host,host2 or none (the peer alone): one 10-minute call each
[ -n "${PEER_PARALLEL:-}" ] && args+=(--peer-parallel "$PEER_PARALLEL")  # e.g. 16: one cadenza row and the peer in a call
python3 -m cadenza bench --scenario "${SCENARIO:-T1}" --experts "${EXPERTS:-int4}" --prompts "${PROMPTS:-1024}" \
  --out "$OUT" --tag "${EXPERTS:-int4}" "${args[@]}" > "$OUT/${SCENARIO:-T1}-${EXPERTS:-int4}.log" 2>&1
echo "rc=$?"
tail -12 "$OUT/${SCENARIO:-T1}-${EXPERTS:-int4}.log"
