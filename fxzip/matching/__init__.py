"""Matching: which features of the models become one merged feature. One file per method (and
"weights", Git Re-Basin weight matching, all spaces at once), their registry, head-wise matching
of attention, weight similarity and the merged width."""
from .match import Match
from .correlation import covariance
from .registry import METHOD_NAMES, METHODS, Method, get_method, match_features
from . import average, permute, zipit, cca, weights  # noqa: F401  each fills METHODS, in this order
from .heads import match_heads
from .similarity import feature_signatures, mix, weight_similarity
from .width import Width, check_width, merged_size, space_widths

__all__ = ["Match", "covariance", "match_heads", "METHOD_NAMES", "METHODS", "Method", "get_method",
           "match_features", "feature_signatures", "mix", "weight_similarity", "Width",
           "check_width", "merged_size", "space_widths"]
