#!/usr/bin/env bash
# Generates the local cluster's PKI into DIR. Each file is made once and kept; a serving
# certificate whose SANs changed is made again (the API server reloads it by itself):
#   ca              cluster CA: signs serving and client certificates
#   apiserver       kube-apiserver serving certificate (loopback and in-cluster names)
#   admin           client cert in system:masters, for the kubeconfig the tests use
#   controller-manager, scheduler
#                   client certs for those components
#   apiserver-kubelet-client
#                   the API server's client cert towards kubelets
#   front-proxy-ca, front-proxy-client
#                   the aggregation layer's request-header CA and the API server's proxy
#                   client cert, so aggregated APIs (custom.metrics.k8s.io) authenticate it
#   sa.key, sa.pub  service-account token signing key pair
#   node-kubelet, node-kubelet-serving, node-kube-proxy
#                   the node tier's (node-up.sh) kubelet client cert (system:node:wsrelay-node),
#                   its serving cert on the node's address, kube-proxy's client cert
# usage: pki.sh DIR
set -euo pipefail
dir=$1
mkdir -p "$dir" && cd "$dir"
days=3650
# The node tier's node: its name and the address kubelet serves on (node-up.sh).
NODE_NAME=wsrelay-node
NODE_IP=10.202.0.2

ca() { # name CN
	[ -f "$1.crt" ] && return
	openssl req -x509 -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.crt" -days $days \
		-subj "/CN=$2" -addext "basicConstraints=critical,CA:TRUE" \
		-addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
}

# cert name ca subject usage [SANs]
cert() {
	local name=$1 signer=$2 subj=$3 usage=$4 sans=${5:-}
	# Kept unless missing or made for other SANs (then made again; the key too).
	[ -f "$name.crt" ] && [ "$(cat "$name.sans" 2>/dev/null)" = "$sans" ] && return
	openssl req -newkey rsa:2048 -nodes -keyout "$name.key" -out "$name.csr" -subj "$subj" 2>/dev/null
	{
		echo "basicConstraints=critical,CA:FALSE"
		echo "keyUsage=critical,digitalSignature,keyEncipherment"
		echo "extendedKeyUsage=$usage"
		[ -z "$sans" ] || echo "subjectAltName=$sans"
	} >"$name.ext"
	openssl x509 -req -in "$name.csr" -CA "$signer.crt" -CAkey "$signer.key" -CAcreateserial \
		-out "$name.crt" -days $days -extfile "$name.ext" 2>/dev/null
	rm -f "$name.csr" "$name.ext"
	echo "$sans" >"$name.sans"
}

ca ca wsrelay-local-ca
ca front-proxy-ca wsrelay-local-front-proxy-ca
cert apiserver ca "/CN=kube-apiserver" serverAuth \
	"IP:127.0.0.1,IP:10.96.0.1,IP:$NODE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
cert admin ca "/O=system:masters/CN=wsrelay-admin" clientAuth
cert controller-manager ca "/CN=system:kube-controller-manager" clientAuth
cert scheduler ca "/CN=system:kube-scheduler" clientAuth
cert apiserver-kubelet-client ca "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
cert front-proxy-client front-proxy-ca "/CN=front-proxy-client" clientAuth
cert node-kubelet ca "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
cert node-kubelet-serving ca "/CN=$NODE_NAME" serverAuth "IP:$NODE_IP,DNS:$NODE_NAME"
# system:kube-proxy is the user the default system:node-proxier binding names.
cert node-kube-proxy ca "/CN=system:kube-proxy" clientAuth
if [ ! -f sa.key ]; then
	openssl genrsa -out sa.key 2048 2>/dev/null
	openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
fi
chmod 600 ./*.key
