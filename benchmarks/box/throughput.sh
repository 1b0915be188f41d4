# #22's T1 (synthetic Mixtral-8x7B, 24 GiB) with int4 experts: the offline job with the KV cache on the GPU, then on
# the host (attention on the CPU). PROMPTS=N (default 1024; 256 fits one call with time to spare), EXPERTS=bf16 for
# the other row set. ~2.5 minutes to build int4 Mixtral, then the two jobs.
# With int4 experts, llama-batched-bench (built by tests.sh) runs after cadenza on the same model as a Q4_0 GGUF.
source benchmarks/box/setup.sh
peer=.peers/llama.cpp/build/bin/llama-batched-bench
args=()
[ "${EXPERTS:-int4}" = int4 ] && [ -x "$peer" ] && args=(--peer "llama.cpp=$peer" --peer-dir /dev/shm)
python3 -m cadenza bench --scenario "${SCENARIO:-T1}" --experts "${EXPERTS:-int4}" --prompts "${PROMPTS:-1024}" \
  --out "$OUT" --tag "${EXPERTS:-int4}" "${args[@]}" > "$OUT/${SCENARIO:-T1}-${EXPERTS:-int4}.log" 2>&1
echo "rc=$?"
tail -12 "$OUT/${SCENARIO:-T1}-${EXPERTS:-int4}.log"
