#!/usr/bin/env bash
# The benchmark driver (`make bench`): the same load, from the same client (wsrelay-load), against
#   wsrelay      the relay, behind its own nats-server
#   nats-ws      nats-server's own WebSocket listener, NATS text protocol ("browsers talk to NATS")
#   centrifuge   the centrifuge library (Centrifugo's engine) behind e2e/cluster/go/centrifuge
# per workload, on loopback only. Each (workload, target) gets a fresh nats-server and a fresh
# server, so peak RSS (VmHWM) and CPU time read from /proc belong to that run alone.
# Writes target/bench/<workload>-<target>.json, target/bench/summary.json, PNG plots, and
# regenerates docs/benchmarks.md.
#
# Environment (all optional):
#   BENCH_WORKLOADS  default "broadcast-1k broadcast-10k personal-10k idle" (quick check: "smoke smoke-personal smoke-idle")
#   BENCH_TARGETS    default "wsrelay nats-ws centrifuge"
#   BENCH_IDLE_CONNECTIONS  default 18000 (the per-process fd limit here is 20000)
#   BENCH_STEP_SECONDS      default 4
#   BENCH_OUT        default <repo>/target/bench
#   BENCH_NO_DOC=1   do not rewrite docs/benchmarks.md
#   BENCH_RELAY_BIN  a wsrelay binary to measure instead of the one built (before/after)
#   BENCH_NO_BUILD=1 use the release binaries already in $CARGO_TARGET_DIR
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
out=${BENCH_OUT:-$root/target/bench}
target_dir=${CARGO_TARGET_DIR:-$root/target}
workloads=${BENCH_WORKLOADS:-broadcast-1k broadcast-10k personal-10k idle}
targets=${BENCH_TARGETS:-wsrelay nats-ws centrifuge}
idle_n=${BENCH_IDLE_CONNECTIONS:-18000}
step=${BENCH_STEP_SECONDS:-4}

log() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

mkdir -p "$out/run"
if [ -z "${BENCH_NO_BUILD:-}" ]; then
	log "building release binaries"
	(cd "$root" && cargo build --release -q -p wsrelay -p wsrelay-e2e --bin wsrelay --bin wsrelay-load)
fi
relay=${BENCH_RELAY_BIN:-$target_dir/release/wsrelay}
load=$target_dir/release/wsrelay-load
log "building nats-server and the centrifuge peer (cached)"
tools=$("$root/e2e/cluster/tools.sh" nats centrifuge)
nats_server=$tools/nats-server
centrifuge=$tools/centrifuge-bench

if ! python3 -c 'import matplotlib' 2>/dev/null; then
	log "installing matplotlib for the plots"
	pip install -q matplotlib >&2 || log "matplotlib unavailable: no plots"
fi

# Every process gets the whole (hard) fd limit; 20000 here, which bounds the idle workload.
ulimit -n "$(ulimit -Hn)"
nofile=$(ulimit -n)
clk_tck=$(getconf CLK_TCK)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_port() { # host port seconds
	local i
	for ((i = 0; i < $3 * 10; i++)); do
		(exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
		sleep 0.1
	done
	return 1
}

pids=()
stop_all() {
	local p
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do
		for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
		kill -9 "$p" 2>/dev/null || true
		wait "$p" 2>/dev/null || true
	done
	pids=()
}
trap stop_all EXIT

run_dir=$out/run
secret=$run_dir/hs256.key
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$secret"
nats_token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf '%s' "$nats_token" >"$run_dir/nats.token"

# Workload name -> wsrelay-load arguments.
workload_args() {
	case $1 in
	broadcast-1k) echo "--workload broadcast --connections 1000 --rate-start 20 --rate-factor 2 --max-steps 9" ;;
	broadcast-10k) echo "--workload broadcast --connections 10000 --rate-start 2 --rate-factor 2 --max-steps 9" ;;
	personal-10k) echo "--workload personal --connections 10000 --rate-start 2000 --rate-factor 2 --max-steps 8" ;;
	smoke) echo "--workload broadcast --connections 200 --rate-start 20 --rate-factor 4 --max-steps 3" ;;
	smoke-personal) echo "--workload personal --connections 2000 --rate-start 2000 --rate-factor 4 --max-steps 2" ;;
	smoke-idle) echo "--workload idle --connections 500 --hold-seconds 1" ;;
	idle) echo "--workload idle --connections $idle_n --hold-seconds 5" ;;
	*) echo "unknown workload $1" >&2; return 1 ;;
	esac
}

run_one() { # workload target
	local w=$1 t=$2 np wp sp ap server_pid nats_pid path json=$out/$1-$2.json
	np=$(free_port); wp=$(free_port); sp=$(free_port); ap=$(free_port)
	cat >"$run_dir/nats.conf" <<-EOF
		listen: 127.0.0.1:$np
		authorization { token: "$nats_token" }
		websocket { listen: "127.0.0.1:$wp", no_tls: true }
		max_connections: 65536
	EOF
	"$nats_server" -c "$run_dir/nats.conf" >"$run_dir/$w-$t.nats.log" 2>&1 &
	nats_pid=$!
	pids+=("$nats_pid")
	wait_port 127.0.0.1 "$np" 10 || { log "nats-server did not start"; return 1; }
	case $t in
	wsrelay)
		cat >"$run_dir/wsrelay.yaml" <<-EOF
			listen: {client: "127.0.0.1:$sp", admin: "127.0.0.1:$ap", path: /ws}
			nats:
			  urls: ["nats://127.0.0.1:$np"]
			  name: wsrelay-bench
			  credentials: {tokenFile: $run_dir/nats.token}
			auth:
			  jwt: {algorithms: [HS256], key: {hmacSecretFile: $secret}}
			  tokenSources: [{type: query, name: token}]
			bindings:
			  - {channel: "bench.{id}", subject: "bench.{id}", direction: subscribe}
			limits: {maxConnections: 19900}
		EOF
		WSRELAY_LOG=warn "$relay" run --config "$run_dir/wsrelay.yaml" >"$run_dir/$w-$t.server.log" 2>&1 &
		server_pid=$!
		path=/ws
		;;
	nats-ws)
		server_pid=$nats_pid
		sp=$wp
		path=/
		;;
	centrifuge)
		"$centrifuge" -listen "127.0.0.1:$sp" -nats "nats://127.0.0.1:$np" -nats-token "$nats_token" \
			-hmac-secret-file "$secret" >"$run_dir/$w-$t.server.log" 2>&1 &
		server_pid=$!
		path=/connection/websocket
		;;
	esac
	[ "$server_pid" = "$nats_pid" ] || pids+=("$server_pid")
	wait_port 127.0.0.1 "$sp" 15 || { log "$t did not start"; stop_all; return 1; }
	[ "$t" != wsrelay ] || for _ in $(seq 100); do
		curl -fs "http://127.0.0.1:$ap/ready" >/dev/null && break
		sleep 0.1
	done
	local pid_args=(--pid "server=$server_pid")
	[ "$server_pid" = "$nats_pid" ] || pid_args+=(--pid "nats=$nats_pid")
	log "$w against $t"
	# shellcheck disable=SC2046
	"$load" --target "$t" $(workload_args "$w") --server "127.0.0.1:$sp" --path "$path" \
		--nats "127.0.0.1:$np" --nats-token "$nats_token" --jwt-secret-file "$secret" \
		--sources 32 --step-seconds "$step" "${pid_args[@]}" --clk-tck "$clk_tck" \
		--max-seconds 240 --out "$json.tmp" || log "wsrelay-load failed for $w/$t (status $?)"
	if [ -f "$json.tmp" ]; then
		python3 - "$json.tmp" "$nofile" "$w" <<-'EOF'
			import json, sys
			p, nofile, w = sys.argv[1], int(sys.argv[2]), sys.argv[3]
			d = json.load(open(p))
			d["workload_name"] = w
			d["nofile_limit"] = nofile
			json.dump(d, open(p, "w"), indent=1)
		EOF
		mv "$json.tmp" "$json"
	fi
	stop_all
	sleep 1
}

started=$SECONDS
for w in $workloads; do
	for t in $targets; do
		run_one "$w" "$t" || log "run $w/$t failed"
	done
done
log "all runs done in $((SECONDS - started))s"

versions=$(
	printf 'wsrelay %s\n' "$(cd "$root" && git rev-parse --short HEAD)$(cd "$root" && git diff --quiet -- relay || echo '+dirty')"
	"$nats_server" --version
	printf 'centrifuge %s\n' "$(awk '$1 == "github.com/centrifugal/centrifuge" { print $2 }' "$root/e2e/cluster/go/centrifuge/go.mod")"
	rustc --version
	go version
)
doc_args=()
[ -n "${BENCH_NO_DOC:-}" ] || doc_args=(--doc "$root/docs/benchmarks.md")
python3 "$root/e2e/bench/report.py" --dir "$out" --versions "$versions" --nofile "$nofile" "${doc_args[@]}"
log "results in $out"
