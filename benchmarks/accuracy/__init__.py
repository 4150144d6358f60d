"""The ZipIt! paper's accuracy protocol on offline data.

    python -m benchmarks.accuracy [--settings a,b,c,d,e] [--pairs 5] [--epochs N] [--width W]
                                  [--quick] [--no-auto] [--out benchmarks/results]
    python -m benchmarks.accuracy --settings a --methods weights --update [--cache DIR]

Settings (every model pair: one architecture, two DIFFERENT initialisations, trained on
disjoint class halves: task A = classes 0–4, task B = classes 5–9):

  a  digits 5+5, `fxzip.demo.digits.ResNet20(width=W)`, cross-entropy heads;
     stops: layer1, layer2, layer3, full (stop_at=None: all but the output layers).
  b  digits 5+5, `DigitsVGG` (the classifier flattens C×H×W = C·2·2 maps); stops: stage1,
     stage2, full.
  c  mnist1d 5+5 (generated offline), `Conv1dNet`; stops: stage1, stage2, stage3, full.
  d  digits 5+5, `ResNet20(width=W)` ending in a Linear to a d=32 embedding, trained so that the
     cosine similarity / T (T=0.07) to 10 fixed random unit class embeddings classifies the
     model's own 5 classes. Split-head stops as in (a), plus "shared": `shared_output=True`
     zips every layer into ONE model with ONE output (the output layer averaged) — the paper's
     ZipIt!20/20 row.
  e  digits 5+5, the `DigitsVGG` of (b) without BatchNorm (norm-free: the BN reset repairs
     nothing there); stops as in (b).

Protocol, per setting:
  * `--pairs` P model pairs are trained (seeds 0..P-1). Pair 0 is the held-out pair, used only
    to choose zipit's `alpha`/`beta` (grid search, separately for every stop point, maximising
    joint accuracy on a VALIDATION split: 20% of the training data that no model is trained
    on). Pairs 1..P-1 are the evaluation pairs: mean ± sample std (ddof=1) over them on the
    test data are reported.
  * Calibration data (feature statistics and BatchNorm reset) = the training inputs of BOTH
    tasks (without the validation split), in batches of 256.
  * BatchNorm statistics are reset on the calibration data for every method, the original
    models (and so the ensemble) included.
  * Accuracies (fractions, shown in %):
      - split heads: joint = argmax over both heads' softmaxes over all 10 classes; task A/B =
        each head on its own classes' test samples (`fxzip.demo.digits.evaluate`).
      - ensemble = the two (BN-reset) original models as two heads, evaluated the same way.
      - model A alone (heads settings): joint = argmax over its 5 classes, counted on all 10
        classes' test samples (so at most ≈ 0.5); task A = its accuracy; task B = 0.2, CHANCE
        level by definition (model A has no outputs for classes 5–9; a blind guess among B's 5
        classes), marked "(chance)". Model B symmetrically.
      - embedding setting (d): class scores are cosine similarities to the class embeddings.
        joint = argmax over all 10 classes; task A/B = argmax restricted to the task's classes.
        With split heads (and for the ensemble) a class's score is the MAX over both heads'
        similarities; task A uses head A, task B head B. A single model (or the shared-output
        merge) is evaluated on both tasks with its one embedding, so model A's task B accuracy
        is measured, not defined.
  * The paper's baselines, uncorrected (no corrections, no weight similarity): "average" = weight
    averaging, "weights" = Git Re-Basin weight matching (`method="weights"`: no data), "permute" =
    Git Re-Basin activation matching; "zipit" = ZipIt! with the held-out pair's alpha/beta.
  * Rows "default" = `Zipper.merge` with every default (zipit, alpha 0.5, beta 1, weight
    similarity 0.01, the label-free corrections); "auto" = `settings="auto"` (alpha, beta and
    corrections on/off chosen per stop point and pair by fidelity to the BN-reset parents on the
    last eighth of the calibration batches: no labels; `fxzip.corrections.auto_settings`).
  * Fidelity study (the section under each table): on the held-out pair, the Spearman rank
    correlation between each zipit (alpha, beta) grid point's fidelity (KL of the heads'
    softmaxes from the parents', or relative error of the outputs; on the calibration slice
    that "auto" uses and on the validation inputs) and its validation joint accuracy; on the
    evaluation pairs, over the "auto" grid, its correlation with test joint accuracy, and the
    test joint accuracy of the fidelity choice ("auto") against the grid point chosen by
    validation labels and the best one by test labels (oracle). Extra rows in
    `accuracy_<setting>_fidelity.csv`.
  * params: `fxzip.runtime.costs.count_parameters`; FLOPs: `fxzip.runtime.costs.count_flops` (torch's
    FlopCounterMode: convolutions and matrix products) on ONE sample; the ensemble counts both
    models.

Outputs in `--out`: `accuracy_<setting>.csv` (one row per pair, method and stop point),
`accuracy_<setting>.md` (the mean ± std table) and `accuracy_<setting>.png` (joint accuracy vs
FLOPs). Torch runs single-threaded by default (`--threads`): on a shared 2-core machine two
threads were up to 10× slower. `--quick` writes the same files; give it another `--out` to keep
the committed results.

`--methods M --update` computes only the rows of methods M (of default, average, weights,
permute, zipit) and merges them into the existing files of `--out`: the evaluation pairs are
retrained from their seeds (or read from `--cache`), their reference rows must reproduce the
CSV's, every other line is kept; the markdown gets a line with the update's own run time.

Modules: `protocol` (one setting: training, the held-out grid search, the rows of every method),
`fidelity_study`, `report` (the files), `update` (`--update`); the settings, data, training,
evaluation and rows are `benchmarks.common`'s (`benchmarks.corrections` and `benchmarks.width` reuse them).
"""

