"""Measurements that write run folders: the readout diagnostic, fidelity, evaluation, sweeps, profiling,
the decision matrix, analyses."""
