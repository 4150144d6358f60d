"""fxzip speed and memory benchmarks.

    python -m benchmarks.speed [--quick] [--threads 2] [--out DIR]
    python -m benchmarks.speed --ratios [--ratio-cases resnet50,vit] [--ratio-taps all,spread,last]
                               [--ratio-images 32] [--ratio-size 224] [--ratio-repeats 2]
                               [--ratio-wall-only] [--threads N]

Six measurements, each printed as a table and written as markdown and CSV under `--out`
(default `benchmarks/results/`), plus `speed.md` with every table (`--ratios`: section 6 alone):

1. merge breakdown (`merge_memory`): seconds per phase (trace, analysis, statistics, matching,
   rewrite, bn_reset) of one full zip (`stop_at=None`) of (a) two ResNet-20×4 on the digits and
   (b) two timm resnet50, each merge run in a fresh subprocess -> `1_merge_breakdown.*`;
2. statistics pass vs plain forward (`statistics_pass`): the statistics of every mergeable space
   on a fresh Zipper divided by plain `no_grad` forwards of both models over the same batches,
   and how the statistics time splits into the tapped forwards and the moment accumulation
   -> `2_statistics_vs_forward.*`, `2b_statistics_breakdown.*`;
3. matching alone (`matching`): the fast ZipIt! greedy against the plain
   `benchmarks.common.reference_zipit`, same assignment required, and the Hungarian `permute`
   -> `3_matching.*`;
4. peak memory (`merge_memory`; max RSS of a fresh subprocess): the models and data alone, plain
   forwards, merge -> `4_peak_memory.*`;
5. inference (`inference`) of the merged ResNet-20×4 against running both originals, per stop
   point, with parameter counts and FLOPs -> `5_inference.*`;
6. cost against the floor (`floor`; `--ratios` runs only this): for two timm resnet50 and two
   timm ViT-S/16, each in a fresh subprocess, the statistics and the whole merge (`fxzip.merge`,
   full zip, BN reset included) for each `--ratio-taps` choice (`taps`, optionally `@positions`:
   "all", "spread", "last", "all@0.25") and fxzip's default merge (corrections on), divided by
   plain forwards of both models over the same batches (interleaved repeats in that one
   process): wall clock with torch's default thread count (`--threads` for another), then CPU
   time in a second subprocess on one thread (not with `--ratio-wall-only`); the merges' phases
   and their peak memory above the models and data -> `6_floor.*`.

The machine may be shared and noisy: times are the minimum over repeats and ratios are taken
within one run, with repetitions of the two sides interleaved. Nothing here asserts on time.
The cases (models and batches) are `benchmarks.common.cases`; the fresh subprocesses
(`children`) re-run `python -m benchmarks.speed --child ...` from the repository root.
"""
