"""e2e tier: the operator on the control plane, workers run as local processes."""
