"""A small user-defined CNN: what `package.module:callable` in a recipe builds."""
import torch
import torch.nn as nn


class TinyNet(nn.Module):
    """conv-bn-relu ×2, global pool, linear: small enough to merge in a fraction of a second."""

    def __init__(self, width: int = 8, num_classes: int = 4, in_chans: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def tiny_net(**kwargs) -> TinyNet:
    """A factory function, as recipes may name one instead of a class."""
    return TinyNet(**kwargs)
