#!/usr/bin/env bash
# A RabbitMQ cluster of N nodes (default 3) on this one machine, for fault
# tests and soak runs. Every node has its own name, ports and data directory
# under one state directory; the machine's own broker (rabbit@localhost,
# 5672/25672/15672) is never touched.
#
#   scripts/rabbitmq-cluster.sh start          start (or restart) every node, join them, print the URL list
#   scripts/rabbitmq-cluster.sh urls           print PREREG_AMQP_URL for the cluster (comma-separated)
#   scripts/rabbitmq-cluster.sh stop-node N    stop node N (1-based) abruptly (SIGKILL), as a crash
#   scripts/rabbitmq-cluster.sh start-node N   start node N again; it rejoins the cluster
#   scripts/rabbitmq-cluster.sh ctl N ARGS…    rabbitmqctl against node N
#   scripts/rabbitmq-cluster.sh diag N ARGS…   rabbitmq-diagnostics against node N
#   scripts/rabbitmq-cluster.sh down           stop every node and delete the state directory
#
# Environment: CLUSTER_DIR (default /tmp/prereg-rabbit-cluster), NODES (3),
# BASE_PORT (first AMQP port, default 35672; node i uses BASE_PORT+i-1 for
# AMQP and BASE_PORT+100+i-1 for Erlang distribution), CLUSTER_NAME (prefix
# of the node names, default prereg-c).
set -euo pipefail

DIR=${CLUSTER_DIR:-/tmp/prereg-rabbit-cluster}
NODES=${NODES:-3}
BASE_PORT=${BASE_PORT:-35672}
NAME=${CLUSTER_NAME:-prereg-c}
BIN=${RABBITMQ_BIN:-/usr/lib/rabbitmq/bin}

node_name() { echo "${NAME}$1@localhost"; }
amqp_port() { echo $((BASE_PORT + $1 - 1)); }
dist_port() { echo $((BASE_PORT + 100 + $1 - 1)); }

node_env() {
  local i=$1 d="$DIR/n$1"
  export HOME="$DIR"
  export RABBITMQ_CONF_ENV_FILE="$d/env.conf"
  export RABBITMQ_NODENAME; RABBITMQ_NODENAME=$(node_name "$i")
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT; RABBITMQ_NODE_PORT=$(amqp_port "$i")
  export RABBITMQ_DIST_PORT; RABBITMQ_DIST_PORT=$(dist_port "$i")
  export RABBITMQ_MNESIA_BASE="$d/mnesia"
  export RABBITMQ_LOG_BASE="$d/log"
  export RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf"
  export RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins"
  export RABBITMQ_PID_FILE="$d/pid"
}

ctl() {
  local i=$1; shift
  ( node_env "$i"; "$BIN/rabbitmqctl" -n "$(node_name "$i")" "$@" )
}

diag() {
  local i=$1; shift
  ( node_env "$i"; "$BIN/rabbitmq-diagnostics" -n "$(node_name "$i")" "$@" )
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_node() {
  local i=$1 d="$DIR/n$1"
  mkdir -p "$d"
  {
    echo 'loopback_users.guest = false'
    echo 'cluster_partition_handling = pause_minority'
    # The nodes find each other on first boot (no join_cluster calls).
    echo 'cluster_formation.peer_discovery_backend = classic_config'
    for j in $(seq 1 "$NODES"); do echo "cluster_formation.classic_config.nodes.$j = $(node_name "$j")"; done
  } >"$d/rabbitmq.conf"
  echo '[].' >"$d/enabled_plugins"
  echo 'ERL_EPMD_ADDRESS=127.0.0.1' >"$d/env.conf"
  if [ -f "$d/group" ] && kill -0 -- "-$(cat "$d/group")" 2>/dev/null; then
    echo "node $i already running"; return 0
  fi
  ( node_env "$i"; setsid "$BIN/rabbitmq-server" >"$d/server.out" 2>&1 & echo $! >"$d/group" )
  local port; port=$(amqp_port "$i")
  for _ in $(seq 1 900); do port_open "$port" && break; sleep 0.1; done
  port_open "$port" || { echo "node $i did not start; see $d/server.out and $d/log" >&2; return 1; }
  echo "node $i ($(node_name "$i")) on 127.0.0.1:$port"
}

stop_node() {
  local i=$1 d="$DIR/n$1"
  if [ -f "$d/group" ]; then
    kill -9 -- "-$(cat "$d/group")" 2>/dev/null || true
    rm -f "$d/group"
  fi
  local port; port=$(amqp_port "$i")
  for _ in $(seq 1 100); do port_open "$port" || break; sleep 0.1; done
  echo "node $i stopped"
}

urls() {
  local out=""
  for i in $(seq 1 "$NODES"); do
    out="${out:+$out,}amqp://guest:guest@127.0.0.1:$(amqp_port "$i")/%2f"
  done
  echo "$out"
}

case "${1:-}" in
  start)
    mkdir -p "$DIR"
    # One Erlang cookie for the cluster (HOME=$DIR), not the machine's.
    [ -f "$DIR/.erlang.cookie" ] || { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/.erlang.cookie"; chmod 400 "$DIR/.erlang.cookie"; }
    # All nodes at once: they form the cluster by peer discovery.
    pids=()
    for i in $(seq 1 "$NODES"); do start_node "$i" & pids+=($!); done
    for p in "${pids[@]}"; do wait "$p"; done
    ctl 1 await_online_nodes "$NODES" --timeout 120 >/dev/null
    echo "cluster up; PREREG_AMQP_URL=$(urls)"
    ;;
  urls) urls ;;
  stop-node) stop_node "${2:?node number}" ;;
  start-node)
    start_node "${2:?node number}"
    ctl "$2" await_startup >/dev/null
    ;;
  ctl) shift; ctl "$@" ;;
  diag) shift; diag "$@" ;;
  down)
    for i in $(seq 1 "$NODES"); do stop_node "$i" >/dev/null; done
    rm -rf "$DIR"
    echo "cluster removed"
    ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
