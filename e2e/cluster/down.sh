#!/usr/bin/env bash
# Stops exactly the processes up.sh started (by their pid files) and removes the state.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
# The node first (node-up.sh): it is a client of the API server, and its processes, mounts,
# network namespace, routes and cgroups live outside $state (so even without $state).
"$here/node-down.sh"
[ -d "$state" ] || exit 0

log() { printf '[cluster-down] %s\n' "$*" >&2; }

# Reverse start order: clients of the API server (the demo operator too) first, etcd last.
for name in wsrelay-operator kube-scheduler kube-controller-manager kube-apiserver nats-server etcd; do
	# Only signal a pid that is still the process we started.
	if pid=$(running_pid "$name"); then
		log "stopping $name (pid $pid)"
		kill -TERM "$pid" 2>/dev/null || true
		for _ in $(seq 1 100); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$state/pids/$name.pid"
done
rm -rf "$state"
ip route del unreachable 10.96.0.0/16 2>/dev/null || true
log "removed $state"
