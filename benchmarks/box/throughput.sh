# #22's T1 (synthetic Mixtral-8x7B, 24 GiB) with int4 experts: the offline job with the KV cache on the GPU, then on
# the host (attention on the CPU). PROMPTS=N (default 1024), EXPERTS=bf16 for the other row set, SCENARIO=T2,
# RUNS=gpu,host,host2,batched (a subset; batched: the latency mode's generate, the baseline; none: the peer
# alone), NO_PEER=1, NO_TIMELINE=1, CHUNK=2048 (--prefill-chunk: tokens a pass carries; files get -chunk2048). A T1
# row takes ~140 s plus ~40 s of timeline, the int4 build ~15 s: two or three rows a call, the peer (~85 s at 16
# sequences, PEER_PARALLEL=16) with one. With int4 experts, llama-batched-bench (built by tests.sh) runs after cadenza
# on the same model as a Q4_0 GGUF.
source benchmarks/box/setup.sh
peer=.peers/llama.cpp/build/bin/llama-batched-bench
if [ ! -x "$peer" ] && [ -f .peers/llama-prebuilt.tar.xz ]; then  # a call without tests.sh before it (carry
  mkdir -p .peers/llama.cpp/build && tar xJf .peers/llama-prebuilt.tar.xz -C .peers/llama.cpp/build  # replaces .peers)
fi
args=()
[ "${EXPERTS:-int4}" = int4 ] && [ -x "$peer" ] && [ -z "${NO_PEER:-}" ] && args=(--peer "llama.cpp=$peer" --peer-dir /dev/shm)
[ -n "${RUNS:-}" ] && args+=(--runs "$RUNS")  # gpu,host,host2 or none (the peer alone): one 10-minute call each
[ -n "${PEER_PARALLEL:-}" ] && args+=(--peer-parallel "$PEER_PARALLEL")  # e.g. 16: one cadenza row and the peer in a call
tag=${EXPERTS:-int4}
[ -n "${CHUNK:-}" ] && args+=(--prefill-chunk "$CHUNK") && tag=$tag-chunk$CHUNK  # tokens a pass carries (default 4096, cadenza batch's)
[ -n "${NO_TIMELINE:-}" ] && args+=(--no-timeline)  # e.g. EXPERTS=bf16 PROMPTS=1024 (~530 s without it)
python3 -m cadenza bench --scenario "${SCENARIO:-T1}" --experts "${EXPERTS:-int4}" --prompts "${PROMPTS:-1024}" \
  --out "$OUT" --tag "$tag" "${args[@]}" > "$OUT/${SCENARIO:-T1}-$tag.log" 2>&1
echo "rc=$?"
tail -12 "$OUT/${SCENARIO:-T1}-$tag.log"
