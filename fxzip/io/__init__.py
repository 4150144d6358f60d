"""Files: saved merged models, model and checkpoint loading, calibration data, recipes."""
