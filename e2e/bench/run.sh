#!/usr/bin/env bash
# The benchmark driver (`make bench`): the same load, from the same client (wsrelay-load), against
#   wsrelay      the relay, behind its own nats-server
#   nats-ws      nats-server's own WebSocket listener, NATS text protocol ("browsers talk to NATS")
#   centrifugo   Centrifugo v6 (the real server, built from the Go module proxy), behind its own
#                nats-server through its NATS broker in raw mode
#   baseline     wsrelay-baseline: bare tokio-tungstenite broadcast, no auth, no NATS (this
#                machine's practical limit)
# on loopback only. The server under test and its nats-server run on one core (taskset; one
# tokio worker, GOMAXPROCS=1), the generator on the other. Per workload, trial after trial, the
# peers are run one after another (their order rotates per trial), each on fresh processes.
# Writes target/bench/<workload>/<target>.<trial>.json, the peers' configs in
# target/bench/config/, summary.json and PNG plots, and regenerates docs/benchmarks.md.
#
# Environment (all optional):
#   BENCH_WORKLOADS  default: every workload below; BENCH_WORKLOADS=smoke is a 1-minute check
#   BENCH_TARGETS    default "wsrelay nats-ws centrifugo baseline"
#   BENCH_TRIALS     trials of broadcast-1k, broadcast-10k and personal-10k (default 3)
#   BENCH_EXTRA_TRIALS  trials of the other workloads (default 1)
#   BENCH_QUICK=1    one trial of each, 2-second steps (about a quarter of the time)
#   BENCH_STEP_SECONDS  default 3 (2 with BENCH_QUICK)
#   BENCH_CORES      "<server core> <generator core>", default "0 1"
#   BENCH_NICE       niceness of every benchmark process, default -15 (as root; 0 otherwise)
#   BENCH_IDLE_CONNECTIONS  default 18000 (the per-process fd limit here is 20000)
#   BENCH_OUT        default <repo>/target/bench
#   BENCH_NO_DOC=1   do not rewrite docs/benchmarks.md
#   BENCH_RELAY_BIN  a wsrelay binary to measure instead of the one built (before/after)
#   BENCH_NO_BUILD=1 use the release binaries already in $CARGO_TARGET_DIR
#   BENCH_NO_PROFILE=1  skip the profile of the relay (perf) that runs with personal-10k
#   (subscribe-plain, subscribe-rule, subscribe-cached and subscribe-miss measure wsrelay's
#   channel authorization alone, issue 25; wsrelay-rule-cost, the CEL rule's cost per
#   evaluation, runs with them; presence-10k measures a 10,000-member presence channel, issue 26:
#   the join cost, the snapshot and its pages, and the churn a steady observer sees, which must
#   be occupancy only and at most one per second: a violation makes the run exit with status 4)
#   BENCH_CONFIG_ONLY=1  only write the peers' configs (target/bench/config/) and stop
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
out=${BENCH_OUT:-$root/target/bench}
target_dir=${CARGO_TARGET_DIR:-$root/target}
# The subscribe-* workloads (wsrelay only) take about 20 s each with BENCH_QUICK, 30 s without;
# presence-10k (wsrelay only) about 50 s either way.
all_workloads="broadcast-1k broadcast-10k personal-10k idle storm-5k slow-1k upstream-1k churn-1k channels-10k wss-1k payload-64 payload-64k payload-1k payload-16k subscribe-plain subscribe-rule subscribe-cached subscribe-miss presence-10k"
workloads=${BENCH_WORKLOADS:-$all_workloads}
targets=${BENCH_TARGETS:-wsrelay nats-ws centrifugo baseline}
quick=${BENCH_QUICK:-}
trials=${BENCH_TRIALS:-$([ -n "$quick" ] && echo 1 || echo 3)}
extra_trials=${BENCH_EXTRA_TRIALS:-1}
idle_n=${BENCH_IDLE_CONNECTIONS:-18000}
step=${BENCH_STEP_SECONDS:-$([ -n "$quick" ] && echo 2 || echo 3)}
read -r server_core gen_core <<<"${BENCH_CORES:-0 1}"
# Every benchmark process runs at this niceness (root only): on a machine shared with other
# work, it keeps the pinned cores for the processes under measurement most of the time.
nice_level=${BENCH_NICE:--15}
[ "$(id -u)" = 0 ] || nice_level=0
# Prefixes (not functions: `$!` must be the process itself, taskset and nice exec into it).
on_server_core=(taskset -c "$server_core" nice -n "$nice_level")
on_gen_core=(taskset -c "$gen_core" nice -n "$nice_level")

log() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

mkdir -p "$out/run" "$out/config"
if [ -z "${BENCH_NO_BUILD:-}" ]; then
	log "building release binaries"
	(cd "$root" && cargo build --release -q --locked -p wsrelay -p wsrelay-e2e --bin wsrelay --bin wsrelay-load --bin wsrelay-baseline --bin wsrelay-effective-config --bin wsrelay-rule-cost)
fi
relay=${BENCH_RELAY_BIN:-$target_dir/release/wsrelay}
load=$target_dir/release/wsrelay-load
baseline=$target_dir/release/wsrelay-baseline
rule_cost=$target_dir/release/wsrelay-rule-cost
# Centrifugo is built only when it is measured (a run of the relay alone, or of workloads only
# the relay runs, needs no Go build). A run of wsrelay-only workloads alone rewrites only their
# sections of docs/benchmarks.md.
has_other= has_authz= has_pres=
for w in $workloads; do
	case $w in subscribe-*) has_authz=1 ;; presence-*) has_pres=1 ;; *) has_other=1 ;; esac
done
wanted_tools=nats
case " $targets " in *" centrifugo "*) [ -z "$has_other" ] || wanted_tools="nats centrifugo" ;; esac
log "building $wanted_tools (cached)"
# shellcheck disable=SC2086 # one word per tool
tools=$("$root/e2e/cluster/tools.sh" $wanted_tools)
nats_server=$tools/nats-server
centrifugo=$tools/centrifugo

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

# Workload -> "p99 limit (ms)|targets it applies to|wsrelay-load arguments". One limit per
# workload, the same for every peer. Targets: all, no-baseline, tls (no baseline: it has no
# TLS), wsrelay (a wsrelay feature the peers have no equivalent of: the others do not run).
workload_spec() {
	local b="--workload broadcast"
	case $1 in
	broadcast-1k) echo "100|all|$b --connections 1000 --rates 10,20,40,80,160,320,640,1280,2560" ;;
	broadcast-10k) echo "500|all|$b --connections 10000 --rates 1,2,4,8,16,32,64,128" ;;
	personal-10k) echo "50|all|--workload personal --connections 10000 --rates 1000,2000,4000,8000,16000,32000,64000" ;;
	channels-10k) echo "50|all|--workload channels --connections 10000 --channels 1000 --rates 100,200,400,800,1600,3200,6400,12800" ;;
	upstream-1k) echo "50|no-baseline|--workload upstream --connections 1000 --rates 500,1000,2000,4000,8000,16000,32000,64000" ;;
	churn-1k) echo "250|no-baseline|--workload churn --connections 1000 --channels 100 --rates 200,400,800,1600,3200,6400,12800" ;;
	storm-5k) echo "1000|all|--workload storm --connections 5000 --rates 10 --reconnect-jitter-ms 1000 --storm-seconds 60" ;;
	payload-64) echo "50|all|$b --connections 100 --payload-bytes 64 --rates 100,200,400,800,1600,3200,6400,12800" ;;
	payload-1k) echo "50|all|$b --connections 100 --payload-bytes 1024 --rates 100,200,400,800,1600,3200,6400" ;;
	payload-16k) echo "50|all|$b --connections 100 --payload-bytes 16384 --rates 25,50,100,200,400,800,1600" ;;
	payload-64k) echo "50|all|$b --connections 100 --payload-bytes 65536 --rates 6,12,25,50,100,200,400" ;;
	wss-1k) echo "100|tls|$b --connections 1000 --rates 10,20,40,80,160,320,640,1280,2560" ;;
	slow-1k) echo "50|all|$b --connections 1000 --slow 100 --payload-bytes 1024 --rates 50,100,200 --refine 0 --step-seconds 8" ;;
	idle) echo "1000|no-baseline|--workload idle --connections $idle_n --rates 1 --hold-seconds 5" ;;
	# Channel authorization (issue 25): 200 connections subscribe (and unsubscribe) to
	# rooms.{room}; the binding's authorize is the variant's (authz_binding below).
	subscribe-plain | subscribe-rule | subscribe-cached | subscribe-miss)
		echo "50|wsrelay|--workload subscribe --authz ${1#subscribe-} --connections 200 --rooms 16 --rates 250,500,1000,2000,4000,8000,16000 --refine 1" ;;
	# Presence (issue 26): 10,000 members (each its own sub) join pres.big (presence_binding)
	# at 500/s; 20 fresh subscribers take the snapshot and page it (limit 1000); then 100
	# members/s leave and 100 new ones join for 15 s under a steady observer. No ladder: the p99
	# limit is not used; the observer's bound (occupancy only, <= 1/s) is the verdict.
	presence-10k) echo "1000|wsrelay|--workload presence --connections 10000 --join-rate 500 --snapshots 20 --page-limit 1000 --rates 100 --churn-seconds 15 --churn-tail-seconds 3" ;;
	smoke) echo "200|all|$b --connections 200 --rates 20,80 --refine 0 --warmup-seconds 1" ;;
	smoke-personal) echo "200|all|--workload personal --connections 500 --rates 500,2000 --refine 0 --warmup-seconds 1" ;;
	smoke-idle) echo "1000|no-baseline|--workload idle --connections 300 --rates 1 --hold-seconds 1" ;;
	*) echo "unknown workload $1" >&2; return 1 ;;
	esac
}

# The relay's binding for the subscribe workloads' channels, per variant (the load generator's
# --authz must match: its tokens carry the rooms the rule reads; cached and miss answer
# authz.bench). Empty for the other workloads.
authz_binding() { # variant
	local b='{channel: "rooms.{room}", subject: "rooms.{room}"'
	case $1 in
	plain) echo "  - $b}" ;;
	rule) echo "  - $b, authorize: {rule: \"vars.room in claims.rooms || 'admin' in claims.roles\"}}" ;;
	cached | miss) echo "  - $b, authorize: {request: {subject: authz.bench, cacheSeconds: 600}}}" ;;
	*) ;;
	esac
}
authz=

# The presence workloads' binding and the registry it needs (pres=1), else nothing: only
# they run with JetStream and the connection registry (every connection an entry in it).
# maxMembersWithEvents is the default, written out: 10,000 members are occupancy only. A
# short leaveGraceSeconds so that the churn's leavers leave within its window.
presence_binding() {
	[ -z "$pres" ] || echo '  - {channel: "pres.{id}", subject: "pres.{id}", presence: {key: "{claims.sub}", maxMembersWithEvents: 200, leaveGraceSeconds: 2}}'
}
presence_registry() {
	[ -z "$pres" ] || echo 'registry: {bucket: wsrelay_bench_reg, relayName: bench, leaseSeconds: 15}'
}
pres=

core_workload() { case $1 in broadcast-1k | broadcast-10k | personal-10k) return 0 ;; *) return 1 ;; esac; }

# wss: a CA (trusted by the generator) and a P-256 certificate for 127.0.0.1 signed by it.
(
	cd "$run_dir"
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
		-keyout ca.key -out ca.crt
	openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 -keyout tls.key -out tls.csr
	printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n' >tls.ext
	openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile tls.ext -out tls.crt
) 2>/dev/null

# The peers' configs (ports filled in per start); with tls=1 the client-facing listener is wss.
tls=
write_configs() { # np sp ap
	local np=$1 sp=$2 ap=$3 ws_tls="no_tls: true" relay_tls="" cf_tls="" js=""
	[ -z "$pres" ] || js="jetstream { store_dir: \"$run_dir/js\", max_file_store: 1G, max_memory_store: 64M }"
	if [ -n "$tls" ]; then
		ws_tls="tls { cert_file: \"$run_dir/tls.crt\", key_file: \"$run_dir/tls.key\" }"
		relay_tls="tls: {certFile: $run_dir/tls.crt, keyFile: $run_dir/tls.key}"
		cf_tls=", \"tls\": {\"enabled\": true, \"cert_pem\": \"$run_dir/tls.crt\", \"key_pem\": \"$run_dir/tls.key\"}"
	fi
	cat >"$run_dir/nats.conf" <<-EOF
		listen: 127.0.0.1:$np
		authorization { token: "$nats_token" }
		websocket { listen: "127.0.0.1:$wp", $ws_tls }
		max_connections: 65536
		$js
	EOF
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
		  - {channel: "bench.{id}", subject: "bench.{id}", direction: both}
		$(authz_binding "$authz")
		$(presence_binding)
		$(presence_registry)
		limits: {maxConnections: 19900, maxMessageBytes: 131072, publishRatePerSecond: 1000, publishBurst: 1000}
		$relay_tls
	EOF
	cat >"$run_dir/centrifugo.json" <<-EOF
		{
		  "log": {"level": "warn"},
		  "http_server": {"address": "127.0.0.1", "port": $sp, "internal_address": "127.0.0.1", "internal_port": "$ap"$cf_tls},
		  "http_api": {"key": "$nats_token"},
		  "client": {"token": {"hmac_secret_key": "$(cat "$secret")"}},
		  "channel": {"namespaces": [{"name": "bench", "allow_subscribe_for_client": true, "allow_publish_for_client": true}]},
		  "broker": {"enabled": true, "type": "nats", "nats": {"url": "nats://$nats_token@127.0.0.1:$np", "raw_mode": {"enabled": true, "channel_replacements": {":": "."}}}}
		}
	EOF
}

start_nats() {
	"${on_server_core[@]}" env GOMAXPROCS=1 "$nats_server" -c "$run_dir/nats.conf" >>"$run_dir/$cur.nats.log" 2>&1 &
	nats_pid=$!
	pids+=("$nats_pid")
	wait_port 127.0.0.1 "$np" 10 || { log "nats-server did not start"; return 1; }
}

start_server() { # target
	case $1 in
	wsrelay)
		"${on_server_core[@]}" env TOKIO_WORKER_THREADS=1 WSRELAY_LOG=warn "$relay" run --config "$run_dir/wsrelay.yaml" >>"$run_dir/$cur.server.log" 2>&1 &
		server_pid=$! ;;
	nats-ws) start_nats; server_pid=$nats_pid; return 0 ;;
	centrifugo)
		"${on_server_core[@]}" env GOMAXPROCS=1 "$centrifugo" -c "$run_dir/centrifugo.json" >>"$run_dir/$cur.server.log" 2>&1 &
		server_pid=$! ;;
	baseline)
		"${on_server_core[@]}" "$baseline" --listen "127.0.0.1:$sp" >>"$run_dir/$cur.server.log" 2>&1 &
		server_pid=$! ;;
	esac
	pids+=("$server_pid")
	wait_port 127.0.0.1 "$sp" 15 || { log "$1 did not start"; return 1; }
	[ "$1" != wsrelay ] || for _ in $(seq 100); do
		curl -fs "http://127.0.0.1:$ap/ready" >/dev/null && break
		sleep 0.1
	done
}

run_one() { # workload target trial
	local w=$1 t=$2 trial=$3 spec limit which wargs path json
	spec=$(workload_spec "$w")
	limit=${spec%%|*}; spec=${spec#*|}
	which=${spec%%|*}; wargs=${spec#*|}
	if [ "$which" != all ] && [ "$t" = baseline ]; then return 0; fi
	if [ "$which" = wsrelay ] && [ "$t" != wsrelay ]; then return 0; fi
	authz= pres=
	case $w in subscribe-*) authz=${w#subscribe-} ;; presence-*) pres=1 ;; esac
	rm -rf "${run_dir:?}/js"
	tls=
	local tls_args=()
	if [ "$which" = tls ]; then tls=1; tls_args=(--tls-ca "$run_dir/ca.crt"); fi
	mkdir -p "$out/$w"
	json=$out/$w/$t.$trial.json
	cur=$w-$t-$trial
	np=$(free_port); wp=$(free_port); sp=$(free_port); ap=$(free_port)
	write_configs "$np" "$sp" "$ap"
	nats_pid=
	[ "$t" = nats-ws ] || [ "$t" = baseline ] || start_nats || return 1
	start_server "$t" || { stop_all; return 1; }
	case $t in
	wsrelay) path=/ws ;;
	nats-ws) sp=$wp; path=/ ;;
	centrifugo) path=/connection/websocket ;;
	baseline) path=/ ;;
	esac
	local pid_args=(--pid "server=$server_pid")
	[ -z "$nats_pid" ] || [ "$server_pid" = "$nats_pid" ] || pid_args+=(--pid "nats=$nats_pid")
	[ "$t" != wsrelay ] || pid_args+=(--metrics "127.0.0.1:$ap")
	local storm=() step_args=(--step-seconds "$step")
	[[ $wargs != *--step-seconds* ]] || step_args=()
	[[ $w != storm-* ]] || { rm -f "$run_dir/ready"; storm=(--ready-file "$run_dir/ready"); }
	log "$w against $t (trial $trial)"
	# shellcheck disable=SC2086
	"${on_gen_core[@]}" "$load" --target "$t" $wargs --server "127.0.0.1:$sp" --path "$path" \
		--nats "127.0.0.1:${np}" --nats-token "$nats_token" --jwt-secret-file "$secret" \
		--sources 32 "${step_args[@]}" --p99-limit-ms "$limit" "${pid_args[@]}" "${storm[@]}" "${tls_args[@]}" \
		--clk-tck "$clk_tck" --max-seconds 400 --out "$json.tmp" 2>>"$run_dir/$cur.load.log" &
	local load_pid=$!
	if [ ${#storm[@]} -gt 0 ]; then
		for _ in $(seq 600); do [ -f "$run_dir/ready" ] || ! kill -0 "$load_pid" 2>/dev/null && break; sleep 0.1; done
		if [ -f "$run_dir/ready" ]; then
			log "storm: SIGKILL $t (pid $server_pid) and start it again"
			kill -9 "$server_pid"; wait "$server_pid" 2>/dev/null || true
			start_server "$t" || log "$t did not come back"
		fi
	fi
	local status=0
	wait "$load_pid" || status=$?
	[ "$status" = 0 ] || log "wsrelay-load failed for $w/$t (status $status; $run_dir/$cur.load.log)"
	if [ "$status" = 4 ]; then
		log "PRESENCE BOUND VIOLATED in $w/$t/$trial: the observer got join/leave or more than one occupancy per second"
		bound_failed+=" $w/$t/$trial"
	fi
	tail -n 30 "$run_dir/$cur.load.log" >&2 || true
	if [ -f "$json.tmp" ]; then
		NICE=$nice_level python3 - "$json.tmp" "$nofile" "$w" "$trial" "$limit" "$server_core" "$gen_core" <<-'EOF'
			import json, sys, os
			p, nofile, w, trial, limit, sc, gc = sys.argv[1:]
			d = json.load(open(p))
			d.update(workload_name=w, trial=int(trial), nofile_limit=int(nofile), p99_limit_ms=float(limit),
			         cores={"server": int(sc), "generator": int(gc)}, nice=int(os.environ.get("NICE", "0")), loadavg=open("/proc/loadavg").read().split()[:3])
			json.dump(d, open(p, "w"), indent=1)
		EOF
		mv "$json.tmp" "$json"
	fi
	stop_all
	sleep 1
}

# The configs as run and as each server reads them (every default filled in), with ports and
# secrets replaced by placeholders, for the document.
np=41001; wp=41002; sp=41003; ap=41004
write_configs "$np" "$sp" "$ap"
scrub() { sed "s/$nats_token/<token>/g; s/$(cat "$secret")/<hs256 key>/g; s/41001/<nats port>/g; s/41002/<nats ws port>/g; s/41003/<server port>/g; s/41004/<admin port>/g"; }
scrub <"$run_dir/nats.conf" >"$out/config/nats-server.conf"
scrub <"$run_dir/wsrelay.yaml" >"$out/config/wsrelay.yaml"
for v in plain rule cached miss; do printf 'subscribe-%s:\n%s\n' "$v" "$(authz_binding "$v")"; done >"$out/config/authorize-bindings.yaml"
pres=1
{
	printf '# wsrelay.yaml (besides the above)\n%s\nbindings:\n%s\n' "$(presence_registry)" "$(presence_binding)"
	printf '# nats-server.conf (besides the above)\n'
	write_configs "$np" "$sp" "$ap"
	grep '^jetstream' "$run_dir/nats.conf" | sed "s|$run_dir|<run dir>|"
} >"$out/config/presence.yaml"
pres=
write_configs "$np" "$sp" "$ap"
scrub <"$run_dir/centrifugo.json" >"$out/config/centrifugo.json"
"$target_dir/release/wsrelay-effective-config" "$run_dir/wsrelay.yaml" | scrub >"$out/config/wsrelay.effective.yaml" || true
[ ! -x "$centrifugo" ] || "$centrifugo" defaultconfig -b "$run_dir/centrifugo.json" -d 2>/dev/null | scrub >"$out/config/centrifugo.effective.json" || true
[ -z "${BENCH_CONFIG_ONLY:-}" ] || { log "configs in $out/config"; exit 0; }

started=$SECONDS
bound_failed=
for w in $workloads; do rm -rf "${out:?}/$w"; done
for w in $workloads; do
	n=$extra_trials
	core_workload "$w" && n=$trials
	for trial in $(seq "$n"); do
		# Rotate the order of the peers from trial to trial.
		read -r -a ts <<<"$targets"
		k=$(((trial - 1) % ${#ts[@]}))
		for t in "${ts[@]:k}" "${ts[@]:0:k}"; do
			run_one "$w" "$t" "$trial" || log "run $w/$t/$trial failed"
		done
	done
done
log "all runs done in $((SECONDS - started))s"

# The CEL rule's cost per evaluation (issue 25): the relay's own Rule in a bounded loop, on the
# server's core, with the subscribe workloads.
rm -f "$out/rule-cost.json"
if [[ " $workloads " == *" subscribe-"* ]]; then
	log "rule cost: wsrelay-rule-cost (the relay's Rule::allows, ns per evaluation)"
	"${on_server_core[@]}" "$rule_cost" >"$out/rule-cost.json.tmp" 2>"$out/rule-cost.log" &&
		mv "$out/rule-cost.json.tmp" "$out/rule-cost.json" || log "rule cost failed: $out/rule-cost.log"
fi

# Resumable channels (issue 11): 5,000 clients on resumable channels of one relay, the relay
# SIGKILLed and another started; every client resumes from its last position. The relay's
# own storm test measures it (lost must be 0; time until all caught up; JetStream reads).
if [ -z "${BENCH_NO_RESUME_STORM:-}" ] && [[ " $workloads " == *" storm-5k "* ]]; then
	log "resumable storm: relay/tests/resume_storm.rs (5,000 clients)"
	if (cd "$root" && cargo test --release -q -p wsrelay --test resume_storm -- --ignored --nocapture) \
		>"$out/resume-storm.log" 2>&1; then
		grep '^storm: .*, lost ' "$out/resume-storm.log" >"$out/resume-storm.txt" || true
	else
		log "resumable storm failed: $out/resume-storm.log"
		printf 'failed: see %s\n' "$out/resume-storm.log" >"$out/resume-storm.txt"
	fi
fi

# Where the relay's CPU goes on personal deliveries (issue 15: a missed target needs the profile
# that says why): the relay's own cost test at 16,000 msg/s over 10,000 personal clients, placed
# as above, with its system calls counted and perf sampling it (cpu-clock, call graphs).
if [ -z "${BENCH_NO_PROFILE:-}" ] && [[ " $workloads " == *" personal-10k "* ]]; then
	mkdir -p "$out/profile"
	rm -f "$out/profile/"*
	if perf stat -e syscalls:sys_enter_sendto -o /dev/null true 2>/dev/null; then
		log "profile: relay/tests/delivery_cost.rs under perf (10,000 personal clients, 16,000 msg/s)"
		if (cd "$root" && GOMAXPROCS=1 NATS_SERVER_BIN=$nats_server COST_RELAY_BIN=$relay \
			COST_SERVER_CORE=$server_core COST_SYSCALLS=1 COST_PERF_OUT=$out/profile/perf.data \
			COST_CONNECTIONS=10000 COST_RATE=16000 COST_MESSAGES=128000 \
			taskset -c "$gen_core" cargo test --release -q -p wsrelay --test delivery_cost -- --ignored --nocapture) \
			>"$out/profile/cost.txt" 2>&1; then
			# Per sample, in the same order: the function it hit, and its kernel call stack (leaf
			# first; user-space stacks do not unwind without frame pointers). cpu_profile.py reads them.
			perf script -i "$out/profile/perf.data" -F ip,sym --hide-call-graph >"$out/profile/leaves.txt" 2>/dev/null || true
			perf script -i "$out/profile/perf.data" -F period,ip,sym >"$out/profile/stacks.txt" 2>/dev/null || true
		else
			log "profile failed: $out/profile/cost.txt"
		fi
	else
		log "perf (with syscall tracepoints) unavailable: no profile"
	fi
fi

{
	printf 'wsrelay %s, binary %s sha256 %.16s built %s\n' "$(cd "$root" && git rev-parse --short HEAD)$(cd "$root" && git diff --quiet -- relay || echo '+dirty')" \
		"${relay#"$root"/}" "$(sha256sum "$relay" | cut -d' ' -f1)" "$(date -u -r "$relay" '+%Y-%m-%d %H:%M UTC')"
	"$nats_server" --version
	[ ! -x "$centrifugo" ] || "$centrifugo" version
	rustc --version
	go version
} >"$out/config/versions.txt"
printf '%s\n' "$((SECONDS - started))" >"$out/config/seconds.txt"
doc_args=()
[ -n "${BENCH_NO_DOC:-}" ] || doc_args=(--doc "$root/docs/benchmarks.md")
# Only wsrelay-only workloads (authorization, presence): only their sections are rewritten.
if [ -z "$has_other" ]; then
	[ -z "$has_authz" ] || doc_args+=(--authorize-only)
	[ -z "$has_pres" ] || doc_args+=(--presence-only)
fi
python3 "$root/e2e/bench/report.py" --dir "$out" --nofile "$nofile" --step "$step" "${doc_args[@]}"
log "results in $out"
if [ -n "$bound_failed" ]; then
	log "FAILED: the presence bound was violated in:$bound_failed (docs/benchmarks.md, Presence)"
	exit 4
fi
