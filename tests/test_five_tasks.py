"""The five-task benchmark's merge (`benchmarks.five_tasks`): five models merged at once into one
model's width. Five permuted copies of one model come back exactly by the matching methods; on a
quick real run (five small CNNs, two digits each) the default merge keeps the tasks apart far
better than the paper's ZipIt!, which keeps them far better than weight averaging."""
import pytest
import torch

import fxzip
from fxzip.demo.digits import ResNet20, load_digits_split
from fxzip.testing import permuted_copy

from benchmarks.common.data import calibration_batches
from benchmarks.common.training import reset_copies
from benchmarks.five_tasks import ARCHS, METHODS, TASKS, merge_rows, merges, train_models
from permute_util import rel_err


def test_five_permuted_copies_merge_back_exactly():
    """permute, weights and ZipIt! (alpha 1: a cluster of perfect copies is never penalised)
    give the model back at every stop point; plain averaging does not."""
    split = load_digits_split()
    calibration = [split.x_train[:512]]
    torch.manual_seed(0)
    model = fxzip.reset_bn(ResNet20(width=1, num_classes=2, blocks_per_stage=1), calibration,
                           progress=False)
    copies = [permuted_copy(model, split.x_train[:8], seed=s)[0] for s in range(1, len(TASKS))]
    methods = {"permute": METHODS["permute"], "weights": METHODS["weights"],
               "zipit": {**METHODS["zipit"], "alpha": 1.0}, "average": METHODS["average"]}
    x = split.x_test
    with torch.no_grad():
        ref = model(x)
        for method, stop, merged in merges([model, *copies], calibration, ["layer1", None],
                                           methods):
            outputs = merged(x)
            assert len(outputs) == len(TASKS)
            err = max(rel_err(out, ref) for out in outputs)
            if method == "average":
                assert err > 0.1, (stop, err)
            else:
                assert err < 1e-5, (method, stop, err)


def test_quick_five_tasks_default_merge_beats_the_papers_zipit():
    """Five DigitsCNNs (6 epochs), merged whole (stop None) into one model's width."""
    split = load_digits_split(seed=0)
    calibration = calibration_batches(split.x_train)
    models = reset_copies(train_models("cnn", split, epochs=6, seed=0, cache=None), calibration)
    methods = {k: METHODS[k] for k in ("average", "zipit", "default")}
    rows = {r["method"]: r for r in merge_rows(models, calibration, split.x_test, split.y_test,
                                               [None], methods)}
    ensemble, average, zipit, default = (rows[k] for k in ("ensemble", "average", "zipit",
                                                           "default"))
    assert ensemble["mean"] > 0.97
    assert default["params"] < ensemble["params"] / 4
    assert default["mean"] > 0.95 and default["mean"] > zipit["mean"]
    assert default["joint"] > zipit["joint"] + 0.1
    assert zipit["mean"] > average["mean"] + 0.15
    assert average["joint"] < 0.3  # averaging five tasks' models keeps none of them


@pytest.mark.parametrize("arch", ["resnet20", "resnet56"])
def test_architectures_trace_with_their_stop_points(arch):
    """Every stop point the benchmark names is one fxzip accepts, each zipping more than the
    one before."""
    _, make, stops = ARCHS[arch]
    zipper = fxzip.Zipper([make(2).eval() for _ in TASKS], torch.randn(16, 1, 8, 8),
                          progress=False)
    trunks = [zipper.trunk(stop) for stop in stops]
    for smaller, larger in zip(trunks, trunks[1:]):  # each stop zips strictly more
        assert smaller and smaller < larger
