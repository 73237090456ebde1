#!/usr/bin/env bash
# A before/after of the relay alone: the same workloads against an old wsrelay binary and the
# one built from this tree, trial after trial interleaved (before, after, before, after...),
# so that drift on the machine falls on both; then compare.py prints each figure's spread
# over the trials and whether the new binary is worse by more than that spread.
#
# usage: e2e/bench/before-after.sh OLD_WSRELAY_BINARY
# Environment: BENCH_WORKLOADS (default "personal-10k broadcast-1k idle"), BENCH_AB_TRIALS
# (default 3), BENCH_AB_OUT (default <repo>/target/bench-ab); every other BENCH_* variable
# of run.sh applies to each run.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
old=${1:?usage: before-after.sh OLD_WSRELAY_BINARY}
[ -x "$old" ] || { echo "not an executable: $old" >&2; exit 2; }
out=${BENCH_AB_OUT:-$root/target/bench-ab}
trials=${BENCH_AB_TRIALS:-3}
export BENCH_WORKLOADS=${BENCH_WORKLOADS:-personal-10k broadcast-1k idle}
target_dir=${CARGO_TARGET_DIR:-$root/target}

(cd "$root" && cargo build --release --locked -q -p wsrelay -p wsrelay-e2e --bin wsrelay --bin wsrelay-load --bin wsrelay-baseline --bin wsrelay-effective-config)
new=$out/wsrelay-after
mkdir -p "$out"
cp "$target_dir/release/wsrelay" "$new"

for t in $(seq 1 "$trials"); do
	for side in before after; do
		bin=$old
		[ "$side" = after ] && bin=$new
		BENCH_TARGETS=wsrelay BENCH_TRIALS=1 BENCH_EXTRA_TRIALS=1 BENCH_NO_DOC=1 BENCH_NO_BUILD=1 \
			BENCH_NO_PROFILE=1 BENCH_RELAY_BIN=$bin BENCH_OUT=$out/$side.$t "$root/e2e/bench/run.sh"
	done
done
python3 "$root/e2e/bench/compare.py" "$out" "$trials" $BENCH_WORKLOADS | tee "$out/compare.txt"
