"""FLOPs model, parity / fidelity / latency measurement, reports and plots."""
