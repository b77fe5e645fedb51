# Sourced by the device-call scripts (speed_remaining.sh, qlip_rebuild.sh), from the repository
# root with $out set: installs the wheels the GPU machine lacks (.whl, where the call carried it)
# into .site, records the machine in $out/machine.txt, and defines
#   limited NAME LIMIT COMMAND...   COMMAND under `timeout LIMIT`, "NAME: exit CODE in S s"
#                                   appended to $out/machine.txt (the caller redirects its output)
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:$PWD/src || exit 1
fi
mkdir -p "$out"
{ nvidia-smi -L 2>/dev/null
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
      2>/dev/null || python3 -c "import torch; print('torch', torch.__version__)"
} >> "$out/machine.txt"
limited() {
    local name=$1 limit=$2 start=$SECONDS; shift 2
    timeout "$limit" "$@"; echo "$name: exit $? in $((SECONDS - start)) s" >> "$out/machine.txt"
}
