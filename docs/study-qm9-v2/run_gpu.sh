#!/usr/bin/env bash
# The QM9 second-edition study on one GPU, one command: bash docs/study-qm9-v2/run_gpu.sh [OUT]
# First a few timed steps of every stage print the expected wall time on this machine (estimate.json),
# then the study runs into OUT (default runs/study-qm9-v2-gpu). Rerunning the script resumes: finished
# pretraining arms and fine-tuning runs are skipped.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-runs/study-qm9-v2-gpu}"
scd study qm9-v2 --out "$out" --config "$here/study-gpu.yaml" --set estimate=true
scd study qm9-v2 --out "$out" --config "$here/study-gpu.yaml"
