#!/usr/bin/env bash
# Builds the `autoglm` binary with candle's `cuda` feature on a machine with
# no CUDA toolkit, using NVIDIA's PyPI wheels (nvcc, headers, libraries), so
# that the binary can be carried to a GPU machine (driver 580 / CUDA 13).
# CUDA 13.4 rather than 13.5: cudarc 0.19 (candle 0.11) refuses toolkits newer
# than 13.4 at build time ("Unsupported cuda toolkit version: 13.5").
#
#   scripts/build-cuda.sh [COMPUTE_CAP]     # default 90 (Hopper: H100/H200)
#
# Output: target/cuda/release/autoglm, and target/cuda/lib/ with links to the
# CUDA libraries it needs at run time (cuBLAS, cuRAND, NVRTC, cudart: about
# 880 MB, so they must be installed on the GPU machine or carried there; put
# them on LD_LIBRARY_PATH). The driver (libcuda.so.1) comes from the GPU
# machine. Without a usable GPU the binary warns and runs on the CPU;
# AUTOGLM_DEVICE=cpu forces the CPU. CI does not run this.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CAP=${1:-90}
TOOLS=target/cuda/tools
if [[ ! -x $TOOLS/venv/bin/python ]]; then
    python3 -m venv "$TOOLS/venv"
fi
# nvcc and headers (runtime, cccl), and the libraries candle links (cublas, curand, nvrtc).
"$TOOLS/venv/bin/pip" install -q \
    nvidia-cuda-nvcc==13.4.92 nvidia-nvvm==13.4.92 nvidia-cuda-crt==13.4.92 \
    nvidia-cuda-runtime==13.4.92 nvidia-cuda-cccl \
    nvidia-cuda-nvrtc==13.4.92 nvidia-cublas nvidia-curand \
  || { echo "build-cuda: cannot install NVIDIA's CUDA wheels from PyPI; the machine needs PyPI access" >&2; exit 1; }
CU=$(echo "$(pwd)/$TOOLS"/venv/lib/python3*/site-packages/nvidia/cu13)
[[ -x $CU/bin/nvcc ]] || { echo "build-cuda: nvcc not found under $CU/bin" >&2; exit 1; }
# The driver library is only a link-time dependency here: link against a stub
# when the machine has no driver (the GPU machine provides the real one).
mkdir -p target/cuda/lib
for l in "$CU"/lib/*.so*; do ln -sf "$l" target/cuda/lib/; done
if ! ldconfig -p | grep -q 'libcuda.so '; then
    # No driver here: link against a stub that defines every driver entry
    # point cudarc declares, with the driver's soname, so that the binary
    # loads the real libcuda.so.1 on the GPU machine.
    cargo fetch --locked -q
    SYS=$(find "${CARGO_HOME:-$HOME/.cargo}"/registry/src -path '*/cudarc-0.19.*/src/driver/sys/mod.rs' | head -n1)
    [[ -n $SYS ]] || { echo "build-cuda: cudarc's driver bindings not found after cargo fetch" >&2; exit 1; }
    grep -oE '^ +fn cu[A-Za-z0-9_]+\(' "$SYS" | grep -oE 'cu[A-Za-z0-9_]+' | sort -u \
        | sed 's/.*/int &(void) { return 100; }/' > target/cuda/libcuda_stub.c  # 100: CUDA_ERROR_NO_DEVICE
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o target/cuda/lib/libcuda.so target/cuda/libcuda_stub.c
    echo "build-cuda: no NVIDIA driver here; linked against a stub of $(wc -l < target/cuda/libcuda_stub.c) driver functions" >&2
fi
for so in target/cuda/lib/lib*.so.*; do
    base=${so%%.so.*}.so
    [[ -e $base ]] || ln -sf "$(basename "$so")" "$base"
done
export PATH=$CU/bin:$PATH CUDA_ROOT=$CU CUDA_PATH=$CU CUDA_HOME=$CU CUDA_COMPUTE_CAP=$CAP
export NVCC_PREPEND_FLAGS="-I$CU/include ${NVCC_PREPEND_FLAGS:-}"
export LIBRARY_PATH=$(pwd)/target/cuda/lib:${LIBRARY_PATH:-}
export RUSTFLAGS="-L $(pwd)/target/cuda/lib ${RUSTFLAGS:-}"
cargo build --release --locked -p autoglm-cli --features cuda --target-dir target/cuda
echo "built target/cuda/release/autoglm (compute capability $CAP); run it with LD_LIBRARY_PATH=target/cuda/lib"
