"""Running models over calibration data: inputs, torch.distributed, per-sample row choices, costs."""
