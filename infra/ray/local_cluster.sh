#!/usr/bin/env bash
# A multi-node Ray cluster on one machine (a head and worker nodes, separate raylets) for tests and demos.
#
#   infra/ray/local_cluster.sh start  STATE_DIR GCS_PORT DASHBOARD_PORT [CPUS_PER_NODE]  # head + one worker
#   infra/ray/local_cluster.sh head   STATE_DIR GCS_PORT DASHBOARD_PORT [HEAD_CPUS]      # the head alone
#   infra/ray/local_cluster.sh join   STATE_DIR [CPUS]                                   # one more worker
#   infra/ray/local_cluster.sh submit STATE_DIR -- scd ingest run /abs/path/job.yaml
#   infra/ray/local_cluster.sh stop   STATE_DIR
#
# `head STATE 6379 8265 0` is the shape of infra/ray/cluster.yaml before its autoscaler adds nodes (a CPU-0
# head); `join` is a node arriving mid-job. Each node runs `ray start --block` in its own process group
# (setsid); `stop` signals exactly those process groups (TERM, then KILL after a grace period). It never runs
# `ray stop`, which would kill every Ray process of the user on the machine (other jobs, a test session's Ray).
# `submit` uses the job-submission API: `ray job submit --working-dir .` from the current folder.
set -euo pipefail

cmd=${1:?usage: local_cluster.sh start|head|join|submit|stop STATE_DIR ...}
state=${2:?STATE_DIR required}
shift 2

wait_for_nodes() {  # wait until the cluster reports $1 alive nodes (while the head lives)
    local want=$1 address=$2
    for _ in $(seq 1 120); do
        kill -0 "$(cat "$state/head.pid")" 2>/dev/null || { tail -n 40 "$state/head.log" >&2; return 1; }
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

export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled  # loopback only; no token to hand around

free_port() {  # a port nobody listens on now
    python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
}

agent_ports() {  # per-node agent ports: Ray's fixed defaults (52365, ...) collide with any other Ray here,
    # e.g. a test session's embedded Ray, and a node whose agent cannot bind accepts no job
    echo "--dashboard-agent-listen-port=$(free_port) --dashboard-agent-grpc-port=$(free_port)" \
         "--runtime-env-agent-port=$(free_port) --metrics-export-port=$(free_port)"
}

start_head() {  # $1 GCS port, $2 dashboard port, $3 CPUs; returns once the job API answers
    local port=$1 dash=$2 cpus=$3 client
    mkdir -p "$state"
    echo "127.0.0.1:$port" > "$state/address"
    echo "http://127.0.0.1:$dash" > "$state/dashboard"
    # a free port for the Ray Client server too: its default (10001) collides with any other cluster here
    client=$(free_port)
    # shellcheck disable=SC2046  # agent_ports prints separate flags
    setsid ray start --head --block --port="$port" --num-cpus="$cpus" --node-ip-address=127.0.0.1 \
        --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$dash" \
        --ray-client-server-port="$client" $(agent_ports) --disable-usage-stats > "$state/head.log" 2>&1 &
    echo $! > "$state/head.pid"
    for _ in $(seq 1 120); do
        grep -q "Ray runtime started" "$state/head.log" 2>/dev/null && break
        kill -0 "$(cat "$state/head.pid")" 2>/dev/null || { cat "$state/head.log" >&2; exit 1; }
        sleep 1
    done
    wait_for_nodes 1 "127.0.0.1:$port"
    for _ in $(seq 1 60); do  # the job API answers once the dashboard's job module is up
        curl -sf "http://127.0.0.1:$dash/api/version" > /dev/null 2>&1 && return 0
        python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$dash/api/version', timeout=2)" \
            2>/dev/null && return 0
        sleep 1
    done
    echo "local_cluster: dashboard on port $dash did not answer" >&2
    exit 1
}

start_worker() {  # $1 CPUs; a worker raylet joins the head in $state (worker.pid, worker-2.pid, ...)
    local cpus=$1 address n name
    address=$(cat "$state/address")
    n=$(find "$state" -maxdepth 1 -name 'worker*.pid' | wc -l)
    name=worker; [ "$n" -gt 0 ] && name="worker-$((n + 1))"
    # shellcheck disable=SC2046  # agent_ports prints separate flags
    setsid ray start --block --address="$address" --num-cpus="$cpus" --node-ip-address=127.0.0.1 \
        $(agent_ports) --disable-usage-stats > "$state/$name.log" 2>&1 &
    echo $! > "$state/$name.pid"
    wait_for_nodes "$((n + 2))" "$address"
}

case "$cmd" in
start)
    start_head "${1:?GCS_PORT required}" "${2:?DASHBOARD_PORT required}" "${3:-1}"
    start_worker "${3:-1}"
    ;;
head)
    start_head "${1:?GCS_PORT required}" "${2:?DASHBOARD_PORT required}" "${3:-0}"
    ;;
join)
    start_worker "${1:-1}"
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
    pidfiles=()  # workers first, the head last
    for f in "$state"/worker*.pid "$state/head.pid"; do [ -f "$f" ] && pidfiles+=("$f"); done
    for f in ${pidfiles[@]+"${pidfiles[@]}"}; do
        kill -TERM -- "-$(cat "$f")" 2>/dev/null || true
    done
    for _ in $(seq 1 20); do
        alive=0
        for f in ${pidfiles[@]+"${pidfiles[@]}"}; do
            kill -0 -- "-$(cat "$f")" 2>/dev/null && alive=1
        done
        [ "$alive" = 0 ] && break
        sleep 0.5
    done
    for f in ${pidfiles[@]+"${pidfiles[@]}"}; do
        kill -KILL -- "-$(cat "$f")" 2>/dev/null || true
        rm -f "$f"
    done
    # `ray start` records the newest cluster for `ray.init()`; forget ours (only ours) once it is gone
    current=/tmp/ray/ray_current_cluster
    port=$(cut -d: -f2 "$state/address" 2>/dev/null || true)
    if [ -n "$port" ] && [ -f "$current" ] && grep -q ":$port\$" "$current"; then rm -f "$current"; fi
    ;;
*)
    echo "usage: local_cluster.sh start|head|join|submit|stop STATE_DIR ..." >&2
    exit 2
    ;;
esac
