#!/usr/bin/env bash
# CI stage: the CUDA build of the extension, checked without a GPU (a failure to build it is a failure).
#  1. torch==$TORCH (a CUDA build) in a venv cached outside the clone, one per torch version; it is made under
#     a temporary name and renamed when complete, so a killed run never leaves a half-made venv to reuse
#     (its scripts' shebangs name the temporary path: run it as $venv/bin/python -m ...);
#  2. the package built against it with nvcc (NANOGPT_BUILD_EXT=1 NANOGPT_BUILD_CUDA=1, archs from
#     NANOGPT_CUDA_ARCHS, default 80;90a) and installed non-editable from a copy of the sources, so the clone's
#     in-tree build (the CPU venv's kernels/_C*.so) is never touched; ccache keeps a rebuild fast;
#  3. .ci/check_cuda_ext.py: it imports, has CUDA kernels, and each op has them where the registry says.
# Environment: NANOGPT_CI_CACHE (default /var/cache/nanogpt-ci), CUDA_HOME (default /usr/local/cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
TORCH=2.14.1
cache="${NANOGPT_CI_CACHE:-/var/cache/nanogpt-ci}"
venv="$cache/venv-torch-$TORCH"
src="$cache/src"  # a fixed path: ccache's hashes include the sources' paths
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9            # one run at a time owns the cache
rm -rf "$cache"/.tmp-*  # what a killed run left half-made

t0=$SECONDS
if [ ! -d "$venv" ]; then
    tmp="$cache/.tmp-venv-torch-$TORCH"
    python3 -m venv "$tmp"
    "$tmp/bin/python" -m pip install -q "torch==$TORCH" ninja
    mv -T "$tmp" "$venv"
fi
py="$venv/bin/python"
echo "cuda build: venv $venv ready after $((SECONDS - t0)) s"

# /usr/local/bin/nvcc may be a wrapper script, from which torch would guess CUDA_HOME=/usr/local (no headers)
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if ! command -v ccache >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -qq ccache || { apt-get update -qq && apt-get install -y -qq ccache; }; } &>/dev/null ||
        echo "cuda build: ccache could not be installed; building without it"
fi
if command -v ccache >/dev/null; then
    # /usr/lib/ccache's c++ is what torch's ninja build runs; PYTORCH_NVCC is the nvcc torch and setup.py run
    export CCACHE_DIR="$cache/ccache" PATH="/usr/lib/ccache:$PATH" PYTORCH_NVCC="ccache $CUDA_HOME/bin/nvcc"
    ccache -z >/dev/null
fi

rm -rf "$src" && mkdir -p "$src"
git ls-files -z --cached --others --exclude-standard | tar -c --null -T - --ignore-failed-read -f - 2>/dev/null |
    tar -x -C "$src"
t1=$SECONDS
"$py" -m pip uninstall -q -y nanogpt 2>/dev/null  # the last run's (same version: pip would keep it)
(cd "$src" && NANOGPT_BUILD_EXT=1 NANOGPT_BUILD_CUDA=1 "$py" -m pip install -q --no-build-isolation .)
echo "cuda build: built and installed in $((SECONDS - t1)) s${PYTORCH_NVCC:+ ($(ccache -s | grep -iE '^ *hits' | head -1 | tr -s ' '))}"
(cd "$cache" && "$py" "$root/.ci/check_cuda_ext.py")
echo "cuda build: stage took $((SECONDS - t0)) s"
