# Shared by up.sh and down.sh (sourced): where the cluster's state lives and how to tell
# whether a component we started is still running.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
state=${WSRELAY_CLUSTER_DIR:-$root/.cluster}

# The name of the executable a pid runs ("" if none). A binary replaced by a rebuild shows
# as "NAME (deleted)" and still counts.
exe_name() {
	local exe
	exe=$(readlink "/proc/$1/exe" 2>/dev/null) || return 0
	exe=${exe% (deleted)}
	echo "${exe##*/}"
}

# The pid of component NAME if it is still the process we started (not a recycled pid):
# one running executable EXE (default NAME).
running_pid() {
	local pidfile=$state/pids/$1.pid pid
	[ -f "$pidfile" ] || return 1
	pid=$(cat "$pidfile")
	[ "$(exe_name "$pid")" = "${2:-$1}" ] && echo "$pid"
}
