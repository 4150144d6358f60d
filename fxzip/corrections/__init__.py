"""After the rewrite: BatchNorm re-estimation, label-free refits and REPAIR, fidelity and automatic settings."""
