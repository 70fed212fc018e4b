#!/usr/bin/env bash
# A two-node Ray cluster on one machine (head + one worker node, separate raylets) for tests and demos.
#
#   infra/ray/local_cluster.sh start  STATE_DIR GCS_PORT DASHBOARD_PORT [CPUS_PER_NODE]
#   infra/ray/local_cluster.sh submit STATE_DIR -- scd ingest run /abs/path/job.yaml
#   infra/ray/local_cluster.sh stop   STATE_DIR
#
# Each node runs `ray start --block` in its own process group (setsid); `stop` signals exactly those two
# process groups (TERM, then KILL after a grace period). It never runs `ray stop`, which would kill every
# Ray process of the user on the machine (other jobs, a test session's embedded Ray).
# `submit` uses the job-submission API: `ray job submit --working-dir .` from the current folder.
set -euo pipefail

cmd=${1:?usage: local_cluster.sh start|submit|stop STATE_DIR ...}
state=${2:?STATE_DIR required}
shift 2

wait_for_nodes() {  # wait until the cluster reports $1 alive nodes
    local want=$1 address=$2
    for _ in $(seq 1 120); do
        n=$(RAY_ADDRESS="$address" python - <<'EOF' 2>/dev/null || echo 0
import ray
ray.init(logging_level="ERROR", log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
EOF
)
        [ "${n:-0}" -ge "$want" ] && return 0
        sleep 1
    done
    echo "local_cluster: only ${n:-0} of $want nodes came up" >&2
    return 1
}

case "$cmd" in
start)
    port=${1:?GCS_PORT required}
    dash=${2:?DASHBOARD_PORT required}
    cpus=${3:-1}
    mkdir -p "$state"
    echo "127.0.0.1:$port" > "$state/address"
    echo "http://127.0.0.1:$dash" > "$state/dashboard"
    export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled  # loopback only; no token to hand around
    setsid ray start --head --block --port="$port" --num-cpus="$cpus" --node-ip-address=127.0.0.1 \
        --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$dash" \
        --disable-usage-stats > "$state/head.log" 2>&1 &
    echo $! > "$state/head.pid"
    for _ in $(seq 1 120); do
        grep -q "Ray runtime started" "$state/head.log" 2>/dev/null && break
        kill -0 "$(cat "$state/head.pid")" 2>/dev/null || { cat "$state/head.log" >&2; exit 1; }
        sleep 1
    done
    setsid ray start --block --address="127.0.0.1:$port" --num-cpus="$cpus" --node-ip-address=127.0.0.1 \
        --disable-usage-stats > "$state/worker.log" 2>&1 &
    echo $! > "$state/worker.pid"
    wait_for_nodes 2 "127.0.0.1:$port"
    for _ in $(seq 1 60); do  # the job API answers once the dashboard's job module is up
        curl -sf "http://127.0.0.1:$dash/api/version" > /dev/null 2>&1 && exit 0
        python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$dash/api/version', timeout=2)" \
            2>/dev/null && exit 0
        sleep 1
    done
    echo "local_cluster: dashboard on port $dash did not answer" >&2
    exit 1
    ;;
submit)
    [ "${1:-}" = "--" ] && shift
    for attempt in $(seq 1 30); do  # the head's job agent can answer a little after the dashboard
        set +e
        RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled ray job submit --address "$(cat "$state/dashboard")" \
            --working-dir . -- "$@" 2>&1 | tee "$state/submit.log"
        rc=${PIPESTATUS[0]}
        set -e
        grep -q "No available agent to submit job" "$state/submit.log" || exit "$rc"
        echo "local_cluster: job agent not ready (attempt $attempt), retrying" >&2
        sleep 2
    done
    exit 1
    ;;
stop)
    for node in worker head; do
        f="$state/$node.pid"
        [ -f "$f" ] || continue
        pid=$(cat "$f")
        kill -TERM -- "-$pid" 2>/dev/null || true
    done
    for _ in $(seq 1 20); do
        alive=0
        for node in worker head; do
            f="$state/$node.pid"
            [ -f "$f" ] && kill -0 -- "-$(cat "$f")" 2>/dev/null && alive=1
        done
        [ "$alive" = 0 ] && break
        sleep 0.5
    done
    for node in worker head; do
        f="$state/$node.pid"
        [ -f "$f" ] || continue
        kill -KILL -- "-$(cat "$f")" 2>/dev/null || true
        rm -f "$f"
    done
    # `ray start` records the newest cluster for `ray.init()`; forget ours (only ours) once it is gone
    current=/tmp/ray/ray_current_cluster
    port=$(cut -d: -f2 "$state/address" 2>/dev/null || true)
    if [ -n "$port" ] && [ -f "$current" ] && grep -q ":$port\$" "$current"; then rm -f "$current"; fi
    ;;
*)
    echo "usage: local_cluster.sh start|submit|stop STATE_DIR ..." >&2
    exit 2
    ;;
esac
