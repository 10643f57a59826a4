#!/usr/bin/env bash
# A real multi-host Ray cluster on one Linux machine: a head and two worker "hosts", each in its
# own network namespace with its own IP on a private bridge and its own /dev/shm, each running
# `ray start`. maverick-ray is deployed with `serve deploy` and its expert shards are pinned to the
# worker hosts (they alone carry the `expert_host` resource). Needs root (ip netns) and the
# project's venv.
set -eEuo pipefail

usage() {
  cat <<'EOF'
usage: cluster/netns-cluster.sh [run|up|down|status] [-h]

  run     (default) up, send a chat request through the head, print the layout, tear down on exit
  up      create the hosts, start Ray on each, deploy the tiny model, send one request; leave it running
  down    stop every process in the hosts' namespaces and remove namespaces, bridge and state
  status  show the hosts, `ray status` and where each expert shard lives

Hosts (subnet from MR_NETNS_SUBNET, default 10.77.231):
  bridge mrbr0   .1   the machine itself (reaches every host)
  mr-head        .10  Ray head: GCS :6379, dashboard :8265, Serve :8000, metrics :8080
  mr-w1, mr-w2   .11, .12  Ray workers: one expert shard each, metrics :8080

Environment: PYTHON (default .venv/bin/python), MR_NETNS_DIR (state, default /tmp/mrn),
MR_NETNS_SUBNET, MR_NETNS_PREFIX (names: <prefix>-head, <prefix>br0; default mr),
MR_MODEL (checkpoint dir; default: a tiny checkpoint made under the state dir).
EOF
}

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
BIN="$(dirname "$PYTHON")"
STATE="${MR_NETNS_DIR:-/tmp/mrn}"
NET="${MR_NETNS_SUBNET:-10.77.231}"
P="${MR_NETNS_PREFIX:-mr}"  # names of the namespaces, bridge and veths
[[ "$P" =~ ^[a-z][a-z0-9]{0,5}$ ]] || { echo "MR_NETNS_PREFIX: 1-6 lowercase letters/digits" >&2; exit 2; }
BRIDGE="${P}br0"
HEAD="$P-head" W1="$P-w1" W2="$P-w2"
HOSTS=("$HEAD" "$W1" "$W2")
declare -A IP=(["$HEAD"]="$NET.10" ["$W1"]="$NET.11" ["$W2"]="$NET.12")
HEAD_IP="${IP[$HEAD]}"
OBJECT_STORE_BYTES=$((150 * 1024 * 1024))
AUTH_ENV=(RAY_AUTH_MODE=token "RAY_AUTH_TOKEN_PATH=$STATE/auth_token")

log() { echo "[netns-cluster] $*" >&2; }
die() { log "error: $*"; exit 1; }
on_host() { local host=$1; shift; ip netns exec "$host" "$@"; }

preflight() {
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
  command -v ip >/dev/null || die "the 'ip' command is missing (Debian package iproute2)"
  [ -x "$PYTHON" ] || die "no Python at $PYTHON: run 'make install' or set PYTHON"
  [ -x "$BIN/ray" ] && [ -x "$BIN/serve" ] || die "ray/serve not found next to $PYTHON"
}

make_network() {
  log "bridge $BRIDGE ($NET.1/24) and hosts ${HOSTS[*]}"
  ip link add "$BRIDGE" type bridge
  ip addr add "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  local host
  for host in "${HOSTS[@]}"; do
    ip netns add "$host"
    ip link add "v$host" type veth peer name eth0 netns "$host"
    ip link set "v$host" master "$BRIDGE" up
    on_host "$host" ip addr add "${IP[$host]}/24" dev eth0
    on_host "$host" ip link set eth0 up
    on_host "$host" ip link set lo up
    on_host "$host" ip route add default via "$NET.1"
  done
  # Bridged frames may pass through iptables (br_netfilter); let this bridge's traffic through.
  if command -v iptables >/dev/null && iptables -S FORWARD >/dev/null 2>&1; then
    iptables -C FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null ||
      iptables -I FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT
  fi
}

# ray start on one host, in its own UTS namespace (hostname = host name), its own /dev/shm (as
# separate machines have: shared-memory transports must not reach across hosts) and temp dir.
ray_start() {
  local host=$1; shift
  mkdir -p "$STATE/$host"
  on_host "$host" unshare --uts --mount sh -c 'hostname "$0"; mount -t tmpfs -o mode=1777 tmpfs /dev/shm; exec "$@"' "$host" \
    env RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 "${AUTH_ENV[@]}" "$BIN/ray" start --node-ip-address="${IP[$host]}" \
    --temp-dir="$STATE/$host" --metrics-export-port=8080 --object-store-memory="$OBJECT_STORE_BYTES" "$@" \
    >"$STATE/$host.start.log" 2>&1 || { cat "$STATE/$host.start.log" >&2; die "ray start failed on $host"; }
}

start_ray() {
  # Ray's token authentication: every node and every client of this cluster shares one token.
  "$PYTHON" -c "import secrets; print(secrets.token_hex(32))" >"$STATE/auth_token"
  chmod 600 "$STATE/auth_token"
  log "ray start --head on $HEAD ($HEAD_IP)"
  ray_start "$HEAD" --head --port=6379 --num-cpus=1 --dashboard-host=0.0.0.0 --dashboard-port=8265
  local host
  for host in "$W1" "$W2"; do
    on_host "$host" timeout 5 bash -c "</dev/tcp/$HEAD_IP/6379" 2>/dev/null ||
      die "$host cannot reach the head's GCS at $HEAD_IP:6379 (bridge/firewall?)"
    log "ray start on $host (${IP[$host]}) joining $HEAD_IP:6379"
    ray_start "$host" --address="$HEAD_IP:6379" --num-cpus=1 --resources='{"expert_host": 1}'
  done
}

write_serve_config() {
  local model="${MR_MODEL:-$STATE/tiny-ckpt}"
  if [ -z "${MR_MODEL:-}" ] && [ ! -f "$model/config.json" ]; then
    log "making the tiny checkpoint at $model (stands in for shared storage: NFS, a PVC)"
    "$BIN/maverick-ray" make-checkpoint "$model" --preset tiny >/dev/null
  fi
  # The replica (API + scheduler) on the head; one EP worker per worker host.
  cat >"$STATE/serve.yaml" <<EOF
proxy_location: EveryNode
http_options: {host: 0.0.0.0, port: 8000}
applications:
  - name: maverick
    route_prefix: /
    import_path: maverick_ray.serve.app:build_app
    args:
      model: $model
      served_model_name: tiny
      ep_size: 2
      placement_strategy: STRICT_SPREAD
      worker_resources: {expert_host: 1}
      dtype: float32
      max_model_len: 1024
      num_replicas: 1
EOF
}

wait_healthy() {
  log "waiting for http://$HEAD_IP:8000/health (loads the shards on both worker hosts)"
  "$PYTHON" - "$HEAD_IP" <<'EOF'
import sys, time, urllib.request
url, deadline = f"http://{sys.argv[1]}:8000/health", time.monotonic() + 300
while True:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            if r.status == 200:
                break
    except OSError as e:
        last = e
    if time.monotonic() > deadline:
        sys.exit(f"not healthy after 300 s: {last}")
    time.sleep(2)
EOF
}

deploy() {
  write_serve_config
  log "serve deploy onto http://$HEAD_IP:8265"
  on_host "$HEAD" env "${AUTH_ENV[@]}" "$BIN/serve" deploy --address "http://$HEAD_IP:8265" "$STATE/serve.yaml" >&2
  wait_healthy
}

# Where each expert shard lives, from the engine's own report.
layout() {
  "$PYTHON" - "$HEAD_IP" <<'EOF'
import json, sys, urllib.request
with urllib.request.urlopen(f"http://{sys.argv[1]}:8000/v1/engine/stats", timeout=30) as r:
    for rank in json.load(r)["ranks"]:
        e = rank["experts"]
        print(f"rank {rank['rank']} on {rank['node_ip']}: experts {e[0]}..{e[-1]} ({len(e)})")
EOF
}

# One chat request through the head's Serve endpoint.
chat() {
  "$PYTHON" - "$HEAD_IP" <<'EOF'
import json, sys, urllib.request
body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello from the head host"}],
        "max_tokens": 8, "temperature": 0}
req = urllib.request.Request(f"http://{sys.argv[1]}:8000/v1/chat/completions", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=120) as r:
    reply = json.load(r)
choice = reply["choices"][0]
print(f"chat: {reply['usage']['completion_tokens']} tokens, finish_reason={choice['finish_reason']}: "
      f"{choice['message']['content']!r}")
EOF
}

down() {
  local host pids
  for host in "${HOSTS[@]}"; do
    ip netns list 2>/dev/null | grep -qw "^$host" || continue
    pids=$(ip netns pids "$host" || true)
    if [ -n "$pids" ]; then
      log "stopping $(echo "$pids" | wc -w) processes on $host"
      kill $pids 2>/dev/null || true
    fi
  done
  for _ in $(seq 1 20); do
    pids=""
    for host in "${HOSTS[@]}"; do
      ip netns list 2>/dev/null | grep -qw "^$host" && pids+="$(ip netns pids "$host" || true) "
    done
    [ -z "${pids// /}" ] && break
    sleep 0.5
  done
  [ -n "${pids// /}" ] && kill -9 $pids 2>/dev/null || true
  for host in "${HOSTS[@]}"; do
    ip link del "v$host" 2>/dev/null || true  # at once; a deleted namespace frees its veth lazily
    ip netns del "$host" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  if command -v iptables >/dev/null; then
    iptables -D FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null || true
  fi
  rm -rf "$STATE"
}

# On a failed `up`: show what the hosts logged, then remove everything.
fail_dump() {
  local f
  log "up failed; last log lines from the hosts:"
  for f in "$STATE"/"$P"-*/session_latest/logs/serve/replica_*.log "$STATE"/"$P"-*/session_latest/logs/worker-*.err; do
    [ -s "$f" ] && { echo "== $f" >&2; tail -n 15 "$f" >&2; }
  done
  down
}

up() {
  preflight
  down
  mkdir -p "$STATE"
  trap 'fail_dump' ERR
  make_network
  start_ray
  deploy
  chat
  layout
  trap - ERR
  log "up: chat at http://$HEAD_IP:8000/v1/chat/completions, dashboard http://$HEAD_IP:8000/dashboard," \
      "metrics http://{$NET.10,$NET.11,$NET.12}:8080/metrics; stop with: $0 down"
}

status() {
  local host
  for host in "${HOSTS[@]}"; do
    ip netns list | grep -qw "^$host" && echo "$host ${IP[$host]}: $(ip netns pids "$host" | wc -l) processes"
  done
  on_host "$HEAD" env "${AUTH_ENV[@]}" "$BIN/ray" status --address "$HEAD_IP:6379" || true
  layout || true
}

case "${1:-run}" in
  -h|--help|help) usage ;;
  up) up ;;
  down) down; log "down" ;;
  status) status ;;
  run) trap 'down; log "torn down"' EXIT; up ;;
  *) usage >&2; exit 2 ;;
esac
