# Sourced by the device-call scripts (speed_remaining.sh, qlip_rebuild.sh), from the repository
# root with $out set: installs the wheels the GPU machine lacks (.whl, where the call carried it)
# into .site, records the machine in $out/machine.txt, keeps the compilers' caches in the
# repository, and defines
#   limited NAME LIMIT COMMAND...   COMMAND under `timeout LIMIT`, "NAME: exit CODE in S s"
#                                   appended to $out/machine.txt (the caller redirects its output)
#   cache_back                      $out/compile_cache.tgz, where CACHE_BACK=1 and it is at most
#                                   15 MB (a call returns files of at most 16 MB)
# The caches: Inductor's (FX graphs, generated kernels, autotuning) and Triton's (compiled kernels,
# the project's autotuned choices) live in .compile_cache/, an ignored folder, which the device
# keeps between calls on a warm machine. A step cut by its limit while compiling therefore
# compiles little when it is run again on that machine (the twenty-second session lost two calls
# to first compiles of 104-159 s a variant on a fresh machine). For a fresh machine, bring the
# cache back with CACHE_BACK=1, unpack it in the repository root and name .compile_cache in the
# next call's carry (the same GPU, torch and Triton: the caches key on them).
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:$PWD/src || exit 1
fi
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.compile_cache/inductor}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.compile_cache/triton}
mkdir -p "$out" "$TORCHINDUCTOR_CACHE_DIR" "$TRITON_CACHE_DIR"
{ nvidia-smi -L 2>/dev/null
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
      2>/dev/null || python3 -c "import torch; print('torch', torch.__version__)"
  echo "compile cache at the start: $(du -sh .compile_cache 2>/dev/null | cut -f1)"
} >> "$out/machine.txt"
limited() {
    local name=$1 limit=$2 start=$SECONDS; shift 2
    timeout "$limit" "$@"; echo "$name: exit $? in $((SECONDS - start)) s" >> "$out/machine.txt"
}
cache_back() {
    [ "${CACHE_BACK:-0}" = 1 ] || return 0
    tar czf "$out/compile_cache.tgz" .compile_cache
    if [ "$(stat -c %s "$out/compile_cache.tgz")" -gt 15728640 ]; then
        echo "compile cache: $(du -sh "$out/compile_cache.tgz" | cut -f1), over 15 MB: not brought back" \
            >> "$out/machine.txt"
        rm "$out/compile_cache.tgz"
    fi
}
