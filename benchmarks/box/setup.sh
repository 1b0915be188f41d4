# Sourced by the other scripts: the wheels cadenza needs beyond the box's own packages, into /tmp/site.
mkdir -p /tmp/site
for w in .whl/*.whl; do
  n=$(basename "$w" | cut -d- -f1)
  case $n in pydantic*|typing*|annotated_types|anyio|idna|certifi|h11)  # the box's own, where present
    python3 -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$n'.lower()) else 1)" 2>/dev/null \
      && continue;;
  esac
  pip install -q --no-deps --target /tmp/site "$w" >/dev/null 2>&1
done
# The cache (the compiled CPU kernel, ~30 s; the link and CPU measurements) in the checkout, git-ignored: the device
# keeps a warm machine's ignored files between calls, and /tmp/czc was gone by the next call (session 16: every call
# compiled the kernel again)
export PYTHONPATH=/tmp/site:$PWD CADENZA_CACHE=$PWD/.czc
# the native libraries built before anything is timed (a user's first run builds them once, like a first download):
# the CPU kernel and the GGUF block mover
python3 -c "from cadenza.kernels import cpu_moe, repack; cpu_moe.available(); repack.moves('Q4_K', 256)" \
  >/dev/null 2>&1 || true
