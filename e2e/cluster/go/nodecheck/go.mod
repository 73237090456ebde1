// The node tier's self-test binary (main.go); standard library only.
module wsrelay.dev/e2e/cluster/nodecheck

go 1.26.0
