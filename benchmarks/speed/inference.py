"""Part of `benchmarks.speed` (`python -m benchmarks.speed`), section 5: inference of the merged
model against running both originals, per stop point, with parameters and FLOPs. Written to
`5_inference.*`."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

import fxzip
from fxzip.runtime.costs import count_flops, count_parameters

from benchmarks.common.cases import Case, plain_forward
from benchmarks.common.tables import Table
from benchmarks.common.timing import interleaved

def inference_per_stop(case: Case, x: torch.Tensor, stops: Sequence[Any], repeats: int) -> Table:
    """Section 5: the merged model vs both originals, per stop point."""
    table = Table("5_inference", f"5. Inference of the merged {case.spec.label} vs both originals "
                  f"(batch of {x.shape[0]}), per stop point",
                  ["stop_at", "zipped", "params", "params/both", "GFLOPs", "FLOPs/both",
                   "merged ms", "both ms", "merged/both"])
    zipper = fxzip.Zipper(case.models, case.batches, progress=False)
    both_params = sum(count_parameters(m) for m in case.models)
    both_flops = sum(count_flops(m, x, per_sample=False) for m in case.models)
    for stop in stops:
        merged = zipper.merge(stop, method="zipit", reset_bn=True)
        plain_forward([merged], [x])  # warm-up
        best = interleaved({"merged": lambda: plain_forward([merged], [x]),
                            "both": lambda: plain_forward(case.models, [x])}, repeats)
        params, flops = count_parameters(merged), count_flops(merged, x, per_sample=False)
        report = merged.fxzip_report
        table.add(repr(stop), f"{report.layers_zipped}/{report.layers_total}", params,
                  params / both_params, flops / 1e9, flops / both_flops, best["merged"] * 1e3,
                  best["both"] * 1e3, best["merged"] / best["both"])
    table.notes += [f"'both' runs the two original eager models; minimum of {repeats} interleaved "
                    "repeats; FLOPs from torch.utils.flop_counter.FlopCounterMode",
                    f"both originals: {both_params:,} parameters, {both_flops / 1e9:.3f} GFLOPs"]
    return table
