//go:build tools

// Package tools records Centrifugo so `go mod tidy` keeps its dependencies.
package tools

import _ "github.com/centrifugal/centrifugo/v6"
