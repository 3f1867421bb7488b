#!/usr/bin/env bash
# A stopped trial's GPU is handed to the next trial, or the sweep refuses up front: never a hang.
# Two ASHA sweeps of the tiny preset on one GPU (run.device=cuda, one trial at a time):
#   1. on a Ray started without its dashboard (`ray start --include-dashboard=false`), joined with --address:
#      expected a one-line refusal (exit 2) before any trial, since nothing would free a stopped trial's GPU;
#   2. on the driver's own local Ray (dashboard on): expected ASHA stops followed each time by a trial that trains.
# Each sweep runs under `timeout`, so a hang shows as exit 124. Usage (GPU machine): benchmarks/stopped_trials.sh [GPU]
set -uo pipefail
gpu=${1:-0}
work=${WORK:-/tmp/stopped-trials}
rm -rf "$work" && mkdir -p "$work"
export CUDA_VISIBLE_DEVICES=$gpu RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
sweep=(python3 -m sweeps.run --space muon_lr --preset tiny --set run.device=cuda --steps 60 --scheduler asha
       --storage "$work/sweeps" --tracking-uri "sqlite:///$work/mlflow.db")

python3 -m ray.scripts.scripts start --head --include-dashboard=false --num-gpus=1 --num-cpus=8 --port=6399 >"$work/ray.log" 2>&1
t0=$(date +%s)
timeout 300 "${sweep[@]}" --address 127.0.0.1:6399 --trials 4 --name dashboard-off >"$work/off.log" 2>&1
echo "dashboard off: exit $? after $(( $(date +%s) - t0 ))s"; tail -n 3 "$work/off.log"
python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1

t0=$(date +%s)
timeout 420 "${sweep[@]}" --trials 6 --name dashboard-on >"$work/on.log" 2>&1
echo "dashboard on: exit $? after $(( $(date +%s) - t0 ))s"; tail -n 25 "$work/on.log"
