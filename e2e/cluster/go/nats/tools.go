//go:build tools

// Package tools records nats-server so `go mod tidy` keeps its dependencies.
package tools

import _ "github.com/nats-io/nats-server/v2"
