// Command etcd starts etcd exactly as the upstream binary does; it exists so the
// server can be built from the Go module proxy at a pinned version.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
