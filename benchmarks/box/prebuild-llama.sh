# Builds llama.cpp's llama-bench and llama-batched-bench for the H200 box on the development machine (its nvcc 13.0
# is the box's; no GPU needed to compile), so a device call need not spend 5 of its session's 30 minutes building
# them. Packs .peers/llama-prebuilt.tar.xz (bin/: the two tools and their shared libraries, RPATH $ORIGIN), which
# tests.sh unpacks into .peers/llama.cpp/build/bin and uses if it runs there, else builds as before.
# The CPU side is built for the box's Xeon (Sapphire Rapids' set: AVX-512 with VBMI/VNNI/BF16, AMX tiles and int8 -
# ggml's own "sapphirerapids" variant) instead of -march=native, which would be this machine's CPU.
# ~45 minutes on 2 cores. usage (repository root): bash benchmarks/box/prebuild-llama.sh [TARBALL]
set -eu
tarball=${1:-../shared/peers/llama.cpp-src.tar.xz}
root=$PWD
work=$(mktemp -d /tmp/llama-prebuild.XXXX)
tar xJf "$tarball" -C "$work"
cd "$work/llama.cpp"
isa=(-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_F16C=ON -DGGML_FMA=ON -DGGML_AVX2=ON -DGGML_BMI2=ON
  -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=ON
  -DGGML_AMX_INT8=ON)
cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 "${isa[@]}" \
  -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF >/dev/null
cmake --build build --target llama-bench llama-batched-bench -j "$(nproc)" >/dev/null
mkdir -p "$root/.peers"
(cd build && tar cJf "$root/.peers/llama-prebuilt.tar.xz" bin/llama-bench bin/llama-batched-bench bin/*.so*)
rm -rf "$work"
ls -la "$root/.peers/llama-prebuilt.tar.xz"
