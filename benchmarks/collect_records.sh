#!/usr/bin/env bash
# Bring a run's records back from the device machine, whose disk goes when it is handed back.
#   bash benchmarks/collect_records.sh RUN DEST            ->  DEST/records.tgz
#   MODELS=1 bash benchmarks/collect_records.sh RUN DEST   ->  also DEST/state_<folder>.tgz
# records.tgz: every JSON/JSONL/text/Markdown/CSV/PNG file under RUN of at most 2 MB, generated images
# left out (metrics with their intervals, reports, timings, logs, Q2B histories, figures), each
# trained policy's qlip.safetensors (T2Q and Q2B, a few hundred KB: what Q2B learned can be read
# here), and a QLIP work folder's trained T2Q (t2q.safetensors, its labels.safetensors) and Q2B
# checkpoint (q2b_ckpt.safetensors), a few hundred KB: carried back with the run folder, they let
# a Q2B training cut by a call's limit resume on a fresh machine from its last checkpoint, beside
# its fingerprints (the twenty-second session's call lost 100 of its 500 iterations without them).
# A call returns at most 8 files of at most 16 MB, 64 MB in all (the device README): bring
# more over several calls while the machine is warm.
# records.tgz is written whole (a temporary file, then renamed), so a call may collect every few
# minutes in the background and a time limit that cuts it still returns the last whole one:
#   (while sleep 120; do bash benchmarks/collect_records.sh RUN "$OUT/c" > /dev/null; done) &
# FEATURES="eval_a eval_b ...": those evals' features.safetensors (with metrics.json,
# settings.json and, for a quantized policy's eval, bits.safetensors) in one DEST/features.tgz,
# in 15 MB parts where larger: what `qlip compare` needs to pair two evals here once the device
# machine is gone (3-4 evals fit one call), and what a random-matched control draws its bits from
# (`--bits-from`; without it the thirteenth session had to evaluate a QLIP row again).
# MODELS=1: each quantized model (a folder with quant_config.json: its state, qlip.json and
# qlip.safetensors, not its calibration capture or reconstruction checkpoints) and each eval's features.safetensors,
# one tarball per folder (the device returns files of at most 16 MB). Unpacked here under the
# repository's runs/ and named in `carry`, they let the next call resume a run whose machine
# went back, from the models instead of from the start. ONLY="folder ...": those folders of RUN
# alone (a call returns at most 8 files).
set -uo pipefail
run=${1:?run folder}; dest=${2:?destination folder}
mkdir -p "$dest"
find "$run" -type f -size -2M -not -path '*/images/*' \( -name '*.json' -o -name '*.txt' \
    -o -name '*.md' -o -name '*.csv' -o -name '*.png' -o -name '*.jsonl' \
    -o -name qlip.safetensors -o -name t2q.safetensors -o -name labels.safetensors \
    -o -name q2b_ckpt.safetensors \) -print0 \
    | tar czf "$dest/records.tgz.part" --null -T - && mv "$dest/records.tgz.part" "$dest/records.tgz"
split_large() {  # the device returns files of at most 16 MB: a larger file travels in 15 MB
    # parts (unpack with `cat NAME.tgz.part-* | tar xzf -`)
    if [ "$(stat -c %s "$1")" -gt 15728640 ]; then split -b 15M "$1" "$1.part-" && rm "$1"; fi
}
if [ -n "${FEATURES:-}" ]; then
    files=()
    for name in $FEATURES; do
        for f in features.safetensors metrics.json settings.json bits.safetensors; do
            [ -f "$run/$name/$f" ] && files+=("$run/$name/$f")
        done
        [ -f "$run/$name/features.safetensors" ] || echo "FEATURES: $run/$name has none" >&2
    done
    [ ${#files[@]} -gt 0 ] && tar czf "$dest/features.tgz" "${files[@]}" && split_large "$dest/features.tgz"
fi
if [ "${MODELS:-0}" = 1 ]; then
    for folder in "$run"/*/; do
        folder=${folder%/}
        if [ -n "${ONLY:-}" ]; then
            case " $ONLY " in *" $(basename "$folder") "*) ;; *) continue ;; esac
        fi
        files=()
        for f in quant_config.json quant_state.safetensors qlip.json qlip.safetensors \
                 features.safetensors bits.safetensors settings.json metrics.json generated.jsonl; do
            [ -f "$folder/$f" ] && files+=("$folder/$f")
        done
        [ -f "$folder/quant_config.json" ] || [ -f "$folder/features.safetensors" ] || continue
        tar czf "$dest/state_$(basename "$folder").tgz" "${files[@]}"
        split_large "$dest/state_$(basename "$folder").tgz"
    done
fi
du -h "$dest"/*.tgz* 2>/dev/null
