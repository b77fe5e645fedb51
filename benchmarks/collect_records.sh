#!/usr/bin/env bash
# Bring a run's small records back from the device machine, whose disk goes when it is handed
# back: every JSON/text/Markdown/CSV/PNG file under RUN of at most 2 MB (not generated images; metrics with their
# intervals, reports, timings, logs, Q2B histories, figures), as one tarball.
#   bash benchmarks/collect_records.sh RUN DEST   ->  DEST/records.tgz
set -uo pipefail
run=${1:?run folder}; dest=${2:?destination folder}
mkdir -p "$dest"
find "$run" -type f -size -2M -not -path '*/images/*' \( -name '*.json' -o -name '*.txt' -o -name '*.md' -o -name '*.csv' \
    -o -name '*.png' \) -print0 | tar czf "$dest/records.tgz" --null -T -
du -h "$dest/records.tgz"
