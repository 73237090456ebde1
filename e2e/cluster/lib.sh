# Shared by the cluster scripts (sourced): where the cluster's state lives and how to tell
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

# Writes a kubeconfig FILE for SERVER with the client certificate $pki/CERT.{crt,key} of
# USER, trusting the cluster CA. (Callers set pki.)
kubeconfig() { # file server user cert
	cat >"$1" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: wsrelay-local
  cluster:
    server: $2
    certificate-authority: $pki/ca.crt
users:
- name: $3
  user:
    client-certificate: $pki/$4.crt
    client-key: $pki/$4.key
contexts:
- name: wsrelay-local
  context: { cluster: wsrelay-local, user: $3 }
current-context: wsrelay-local
KUBECONFIG
}

# Starts COMMAND... detached as component NAME: in its own session (it outlives the calling
# script and no terminal signal reaches it), output in $state/logs/NAME.log, pid in
# $state/pids/NAME.pid. Left alone while the process started last time still runs.
# (Callers define log.)
start() { # name command...
	local name=$1
	shift
	if running_pid "$name" "$(basename "$1")" >/dev/null; then
		log "$name already running (pid $(cat "$state/pids/$name.pid"))"
		return
	fi
	log "starting $name"
	setsid "$@" >>"$state/logs/$name.log" 2>&1 </dev/null &
	echo $! >"$state/pids/$name.pid"
}
