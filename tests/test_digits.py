"""Real data: two CNNs trained on disjoint halves of the digits; zipit beats weight averaging."""
import pytest
import torch

import fxzip
from fxzip.demo.digits import DigitsCNN, evaluate, load_digits_split, train_task_pair


@pytest.fixture(scope="module")
def trained():
    split = load_digits_split(seed=0)
    models = train_task_pair(split, lambda: DigitsCNN(width=8), seed=0, epochs=12)
    calibration = [split.x_train[i:i + 256] for i in range(0, len(split.x_train), 256)]
    return split, models, fxzip.Zipper(models, calibration, progress=False)


def test_the_models_learned_their_tasks(trained):
    split, models, _ = trained
    ensemble = evaluate(models, split.x_test, split.y_test)
    assert ensemble.task_a > 0.9 and ensemble.task_b > 0.9
    assert ensemble.joint > 0.85


@pytest.mark.parametrize("stop_at", ["bn2", "bn3"])
def test_zipit_beats_weight_averaging_on_joint_accuracy(trained, stop_at):
    split, _, zipper = trained
    accuracy = {method: evaluate(zipper.merge(stop_at, method=method, corrections=None), split.x_test, split.y_test)
                for method in ("average", "permute", "zipit")}
    assert accuracy["zipit"].joint > accuracy["average"].joint + 0.1, accuracy
    assert accuracy["zipit"].joint > accuracy["permute"].joint, accuracy


def test_stop_before_first_layer_is_the_ensemble(trained):
    split, models, zipper = trained
    merged = zipper.merge(0, reset_bn=False)
    with torch.no_grad():
        out_a, out_b = merged(split.x_test)
        torch.testing.assert_close(out_a, models[0](split.x_test))
        torch.testing.assert_close(out_b, models[1](split.x_test))
