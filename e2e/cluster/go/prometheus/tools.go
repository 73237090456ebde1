//go:build tools

// Package tools records the prometheus and promtool commands so `go mod tidy` keeps their
// dependencies.
package tools

import (
	_ "github.com/prometheus/prometheus/cmd/prometheus"
	_ "github.com/prometheus/prometheus/cmd/promtool"
)
