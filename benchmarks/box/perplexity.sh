# #21's device half: cadenza perplexity, int8 and int4 experts against bf16, on a synthetic full-width Mixtral cut to
# $1 layers (default 8: 23 GB of f16 experts) written as a GGUF with f16 experts (a vocabulary to read text).
source benchmarks/box/setup.sh
layers=${1:-8}
file=/dev/shm/mixtral${layers}-f16.gguf
python3 -c "from cadenza.bench.synthetic import SyntheticCheckpoint; from cadenza.bench.gguf_export import write_gguf; write_gguf(SyntheticCheckpoint('mixtral-8x7b', layers=$layers), '$file', 'f16')"
head -c 20000 README.md > /tmp/text.txt
for fmt in int8 int4; do
  python3 -m cadenza perplexity --model "$file" --file /tmp/text.txt --experts $fmt --baseline --device cuda \
    --gpu-memory 24GiB --context 512 --json > "$OUT/perplexity-mixtral${layers}-$fmt.json" 2> "$OUT/perplexity-$fmt.log"
  echo "$fmt rc=$?"; cat "$OUT/perplexity-mixtral${layers}-$fmt.json"
done
rm -f "$file"
