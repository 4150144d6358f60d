"""Capture: each model becomes a torch.fx graph with shapes on every node, and the graphs of all models are paired node by node."""
