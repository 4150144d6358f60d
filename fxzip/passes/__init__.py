"""The graph passes: analysis (feature spaces), statistics, rewrite."""
