"""The benchmarks' data, all offline: scikit-learn's digits (N, 1, 8, 8) and mnist1d (N, 1, 40),
a validation split held out of the training data, and calibration batches."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fxzip.demo.digits import DigitsSplit, load_digits_split

VAL_FRACTION = 0.2
CALIBRATION_BATCH = 256


def calibration_batches(x: torch.Tensor, size: int = CALIBRATION_BATCH) -> list[torch.Tensor]:
    """`x` in consecutive batches of `size` (the last one shorter)."""
    return [x[i:i + size] for i in range(0, len(x), size)]


@dataclass
class TaskData:
    """Training data (without the validation split) and test data in `split`, the validation split,
    and the calibration batches (training inputs of both tasks)."""

    split: DigitsSplit
    x_val: torch.Tensor
    y_val: torch.Tensor

    @property
    def calibration(self) -> list[torch.Tensor]:
        return calibration_batches(self.split.x_train)


def hold_out_validation(split: DigitsSplit, fraction: float = VAL_FRACTION) -> TaskData:
    """Move the first `fraction` of the (already shuffled) training data to a validation split."""
    n_val = int(len(split.y_train) * fraction)
    train = DigitsSplit(split.x_train[n_val:], split.y_train[n_val:], split.x_test, split.y_test)
    return TaskData(train, split.x_train[:n_val], split.y_train[:n_val])


def validation_as_test(split: DigitsSplit, fraction: float = VAL_FRACTION) -> DigitsSplit:
    """`hold_out_validation` as one split whose test data is the validation split (for choosing
    hyper-parameters on a held-out pair without touching the test data)."""
    data = hold_out_validation(split, fraction)
    return DigitsSplit(data.split.x_train, data.split.y_train, data.x_val, data.y_val)


def load_digits() -> TaskData:
    """scikit-learn's digits (N, 1, 8, 8), split by `fxzip.demo.digits.load_digits_split(seed=0)`."""
    return hold_out_validation(load_digits_split(seed=0))


def load_mnist1d() -> TaskData:
    """mnist1d generated offline with its default arguments (4,000 train / 1,000 test), (N, 1, 40),
    standardised with the training mean and std."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    x = torch.tensor(data["x"], dtype=torch.float32).unsqueeze(1)
    x_test = torch.tensor(data["x_test"], dtype=torch.float32).unsqueeze(1)
    mean, std = x.mean(), x.std()
    split = DigitsSplit((x - mean) / std, torch.tensor(data["y"], dtype=torch.long),
                        (x_test - mean) / std, torch.tensor(data["y_test"], dtype=torch.long))
    return hold_out_validation(split)
