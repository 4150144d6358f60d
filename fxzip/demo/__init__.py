"""The demo's offline data and models: scikit-learn's digits split into two tasks, small CNNs trained on the CPU."""
