"""The demo: scikit-learn's digits split into two tasks (classes 0–4 and 5–9), small CNNs trained
on the CPU in seconds (`digits`), and the run of `fxzip demo` that merges two of them with every
method at every stage boundary (`run`)."""
