//go:build tools

// Package tools records kubeconform so `go mod tidy` keeps its dependencies.
package tools

import _ "github.com/yannh/kubeconform/cmd/kubeconform"
