//go:build tools

// Package tools pins the command the test bed builds, so go mod tidy keeps it.
package tools

import (
	_ "helm.sh/helm/v3/cmd/helm"
)
