"""Matching: which features of the models become one merged feature; one file per method, and their registry."""
