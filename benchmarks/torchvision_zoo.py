"""fxzip over torchvision's classification models: which trace, how far they zip, and whether
merging a model with a permuted copy of itself gives the model back.

    python -m benchmarks.torchvision_zoo [--models resnet18,swin_t] [--timeout 300]
                                         [--run LABEL] [--out benchmarks/results]

Every family `torchvision.models.list_models(module=torchvision.models)` offers, its smallest
variant, `weights=None`, 5 classes, a small input where the model allows one (ViT and MaxViT
are built for it: ViT-B/32 with `image_size=64`, MaxViT-T's configuration with
2 × 2 partitions; Inception-v3 needs 75 pixels or more); each in a fresh subprocess: two
instances from seeds 0 and 1, their BatchNorm statistics estimated on 32 random calibration
images and zero-initialised Linear layers re-drawn (as after training: ViT's zero head would
make every output 0, and a merge's error to it meaningless).

Columns (the self-merge against a permuted copy where one can be built, else a plain copy): see
`benchmarks.common.zoo`.

Writes `torchvision_zoo.md` and `torchvision_zoo.csv` to `--out` (default benchmarks/results).
"""
from __future__ import annotations

from benchmarks.common import zoo

# (torchvision name, input size, family): the smallest variant of each family
MODELS = [
    ("alexnet", 64, "AlexNet"), ("vgg11", 64, "VGG"), ("vgg11_bn", 64, "VGG-BN"),
    ("resnet18", 64, "ResNet"), ("resnext50_32x4d", 64, "ResNeXt"),
    ("wide_resnet50_2", 64, "Wide ResNet"), ("squeezenet1_1", 64, "SqueezeNet"),
    ("densenet121", 64, "DenseNet"), ("googlenet", 64, "GoogLeNet"),
    ("inception_v3", 96, "Inception v3"), ("mobilenet_v2", 64, "MobileNet v2"),
    ("mobilenet_v3_small", 64, "MobileNet v3"), ("mnasnet0_5", 64, "MNASNet"),
    ("shufflenet_v2_x0_5", 64, "ShuffleNet v2"), ("efficientnet_b0", 64, "EfficientNet"),
    ("efficientnet_v2_s", 64, "EfficientNet v2"), ("regnet_x_400mf", 64, "RegNetX"),
    ("regnet_y_400mf", 64, "RegNetY"), ("convnext_tiny", 64, "ConvNeXt"),
    ("vit_b_32", 64, "ViT"), ("swin_t", 64, "Swin"), ("swin_v2_t", 64, "Swin v2"),
    ("maxvit_t", 64, "MaxViT"),
]


def build(name: str, size: int, seed: int):
    import torch
    import torchvision
    from torchvision.models.maxvit import MaxVit

    torch.manual_seed(seed)
    if name == "vit_b_32":  # ViT-B/32 for the small image: 2 × 2 patches
        model = torchvision.models.vit_b_32(weights=None, num_classes=5, image_size=size)
    elif name == "maxvit_t":  # MaxViT-T's configuration with 2 × 2 windows and grids (64 pixels)
        model = MaxVit(input_size=(size, size), stem_channels=64, partition_size=2,
                       block_channels=[64, 128, 256, 512], block_layers=[2, 2, 5, 2], head_dim=32,
                       stochastic_depth_prob=0.2, num_classes=5)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=5)
    with torch.no_grad():  # zero-initialised Linear layers (ViT's head) make the outputs 0, which
        for module in model.modules():  # any merge "gives back": re-drawn, as after training
            if isinstance(module, torch.nn.Linear) and not module.weight.any():
                module.weight.normal_(0.0, 0.02)
    return model


def main(argv: list[str] | None = None) -> None:
    zoo.main("benchmarks.torchvision_zoo", __doc__, MODELS, build, "torchvision_zoo", images=32,
             argv=argv)


if __name__ == "__main__":
    main()
