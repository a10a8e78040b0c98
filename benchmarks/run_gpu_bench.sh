#!/usr/bin/env bash
# The GPU benchmark on a GPU machine without network access (such as a lent H100): install the
# carried source packages, build fast_jl for this card, run bench_gpu.py; JSON, table and
# log land in $OUT (or benchmarks/results/ where OUT is unset).
#
# Beforehand, on a machine with network, in the repository root:
#   mkdir -p .gpu_pkgs && echo /.gpu_pkgs/ >> .git/info/exclude
#   .venv/bin/pip download --no-deps --no-binary :all: -d .gpu_pkgs traker==0.3.2 fast_jl==0.1.3
# Then on the GPU machine, with .gpu_pkgs carried along, from the repository root:
#   bash benchmarks/run_gpu_bench.sh            # extra arguments go to bench_gpu.py, e.g. --parts training
#
# The machine's python3 must hold torch, torchvision, numpy, pandas, pyarrow, scipy,
# scikit-learn, matplotlib, pillow, pyyaml and tqdm (d3m_lib's other dependencies are not
# imported by the benchmark). fast_jl 0.1.3's setup.py hard-codes TORCH_CUDA_ARCH_LIST
# "7.0+PTX", which nvcc 13 refuses; the card's own compute capability replaces it. When it
# does not build within FASTJL_TIMEOUT seconds, traker falls back to its BasicProjector and
# the JSON says so.
set -uo pipefail
py=${PYTHON:-python3}
out=${OUT:-benchmarks/results}
site=${SITE:-/tmp/d3m_site}
pkgs=${PKGS:-.gpu_pkgs}
mkdir -p "$site" "$out"
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv
  if ! "$py" -c "import trak" 2>/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" "$pkgs"/traker-0.3.2.tar.gz \
      || { echo "traker is missing and $pkgs/traker-0.3.2.tar.gz did not install"; exit 1; }
  fi
  if ! "$py" -c "import torch, fast_jl" 2>/dev/null && [ -f "$pkgs/fast_jl-0.1.3.tar.gz" ]; then
    arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)
    src=$(mktemp -d)
    tar xzf "$pkgs/fast_jl-0.1.3.tar.gz" -C "$src"
    sed -i "s/7\.0+PTX/${arch}/" "$src/fast_jl-0.1.3/setup.py"
    grep -n TORCH_CUDA_ARCH_LIST "$src/fast_jl-0.1.3/setup.py"
    # CUDA headers torch's own headers include (cusparse.h, ...) may live only in pip's nvidia/* packages
    nv_inc=$("$py" -c "import glob, nvidia; print(':'.join(d for p in nvidia.__path__ for d in glob.glob(p + '/*/include')))" \
             2>/dev/null || true)
    # and the linker wants an unversioned libcudart.so, which pip's nvidia packages do not ship
    libdir=$(mktemp -d)
    for f in /usr/local/cuda/lib64/libcudart.so $("$py" -c "import glob, nvidia; print(' '.join(f for p in \
             nvidia.__path__ for f in glob.glob(p + '/*/lib/libcudart.so.*')))" 2>/dev/null); do
      [ -f "$f" ] && ln -sf "$f" "$libdir/libcudart.so" && break
    done
    t0=$(date +%s)
    CPATH="${nv_inc}${CPATH:+:$CPATH}" LIBRARY_PATH="$libdir${LIBRARY_PATH:+:$LIBRARY_PATH}" timeout "${FASTJL_TIMEOUT:-240}" "$py" -m pip install -q --no-index --no-deps \
      --no-build-isolation --target "$site" "$src/fast_jl-0.1.3" > "$out/fast_jl_build.log" 2>&1 \
      && echo "fast_jl built for compute capability $arch in $(( $(date +%s) - t0 )) s" \
      || echo "fast_jl did not build (see $out/fast_jl_build.log): traker uses its BasicProjector"
  fi
  "$py" benchmarks/bench_gpu.py --device cuda --out "$out/gpu_cuda.json" "$@"
} 2>&1 | tee "$out/bench_gpu.log"
