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
export PYTHONPATH=/tmp/site:$PWD CADENZA_CACHE=/tmp/czc
