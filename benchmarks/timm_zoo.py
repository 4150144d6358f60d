"""fxzip over the timm model zoo: which architectures trace, how far they zip, and whether
merging a model with a permuted copy of itself gives the model back.

    python -m benchmarks.timm_zoo [--models resnet18,vit_tiny_patch16_224] [--timeout 300]
                                  [--run LABEL] [--out benchmarks/results]

(`--models` measures only those and updates their rows in the existing tables; without it, every
model: hours of CPU.)

Per architecture (smallest variant, `pretrained=False`, 5 classes, a small input; each in a
fresh subprocess): two instances from seeds 0 and 1, their BatchNorm statistics estimated on 16
random calibration images (as after training; with timm's initial statistics many units are
dead), zero-initialised classifiers re-drawn (timm zero-inits some heads, which makes every
output 0). VGG-11 runs at 32 pixels: its ConvMlp head pools any smaller map up to 7×7 anyway,
and its 7×7 convolution (100M weights) is what costs memory, not the input.

Columns (the self-merge against a permuted copy where one can be built, else a plain copy): see
`benchmarks.common.zoo`.

Writes `timm_zoo.md` and `timm_zoo.csv` to `--out` (default benchmarks/results).
"""
from __future__ import annotations

from benchmarks.common import zoo

# (timm name, input size, family)
MODELS = [
    ("resnet18", 64, "ResNet"), ("resnet50", 64, "ResNet"), ("resnext26ts", 64, "ResNeXt"),
    ("seresnet18", 64, "SE-ResNet"), ("wide_resnet50_2", 64, "Wide-ResNet"),
    ("resnet26d", 64, "ResNet-D"), ("vgg11", 32, "VGG"), ("densenet121", 64, "DenseNet"),
    ("efficientnet_b0", 64, "EfficientNet"), ("efficientnet_lite0", 64, "EfficientNet"),
    ("mobilenetv2_050", 64, "MobileNet v2"), ("mobilenetv3_small_050", 64, "MobileNet v3"),
    ("mnasnet_050", 64, "MnasNet"), ("tinynet_e", 64, "TinyNet"), ("lcnet_050", 64, "LCNet"),
    ("ghostnet_050", 64, "GhostNet"), ("regnetx_002", 64, "RegNet"), ("repvgg_a0", 64, "RepVGG"),
    ("dla34", 64, "DLA"), ("hrnet_w18_small", 64, "HRNet"), ("inception_v3", 96, "Inception"),
    ("legacy_xception", 96, "Xception"), ("dpn68", 64, "DPN"), ("rexnet_100", 64, "ReXNet"),
    ("cspresnet50", 64, "CSPNet"), ("res2net50_14w_8s", 64, "Res2Net"),
    ("nf_resnet26", 64, "NF-ResNet"), ("gernet_s", 64, "GENet"),
    ("ese_vovnet19b_slim", 64, "VoVNet"), ("convnext_atto", 64, "ConvNeXt"),
    ("convnextv2_atto", 64, "ConvNeXt v2"), ("vit_tiny_patch16_224", 64, "ViT"),
    ("deit_tiny_patch16_224", 64, "DeiT"), ("swin_tiny_patch4_window7_224", 224, "Swin"),
    ("cait_xxs24_224", 64, "CaiT"), ("pit_ti_224", 64, "PiT"), ("coat_lite_tiny", 64, "CoaT"),
    ("mixer_s16_224", 64, "MLP-Mixer"), ("resmlp_12_224", 64, "ResMLP"),
    ("poolformer_s12", 64, "PoolFormer"), ("edgenext_xx_small", 64, "EdgeNeXt"),
    ("fastvit_t8", 64, "FastViT"), ("maxvit_nano_rw_256", 64, "MaxViT"),
    ("eva02_tiny_patch14_224", 56, "EVA-02"), ("levit_128s", 224, "LeViT"),
    ("mobilevit_xxs", 64, "MobileViT"), ("crossvit_tiny_240", 240, "CrossViT"),
    # current families: separate / reduced / interleaved q, k, v, rotary embeddings, register
    # tokens, relative biases, channel attention, linear attention, focal modulation, ...
    ("pvt_v2_b0", 64, "PVT-v2"), ("xcit_nano_12_p16_224", 64, "XCiT"),
    ("vit_little_patch16_reg1_gap_256", 64, "ViT (registers)"), ("deit3_small_patch16_224", 64, "DeiT-III"),
    ("convit_tiny", 64, "ConViT"), ("efficientformerv2_s0", 64, "EfficientFormer-v2"),
    ("efficientvit_b0", 64, "EfficientViT (MIT)"), ("mobilevitv2_050", 64, "MobileViT-v2"),
    ("focalnet_tiny_srf", 64, "FocalNet"), ("davit_tiny", 64, "DaViT"),
    ("nextvit_small", 64, "Next-ViT"), ("mobilenetv4_hybrid_medium", 64, "MobileNet v4"),
    ("caformer_s18", 64, "MetaFormer (CAFormer)"), ("coatnet_nano_rw_224", 64, "CoAtNet"),
    ("regnetz_005", 64, "RegNet-Z"), ("ghostnetv2_100", 64, "GhostNet-v2"), ("repvit_m1", 64, "RepViT"),
    ("inception_next_atto", 64, "InceptionNeXt"), ("mambaout_femto", 64, "MambaOut"),
    ("hgnetv2_b0", 64, "HGNet-v2"), ("starnet_s050", 64, "StarNet"), ("gmlp_ti16_224", 64, "gMLP"),
    ("resnest14d", 64, "ResNeSt"), ("skresnet18", 64, "SKNet"), ("nf_regnet_b0", 64, "NF-RegNet"),
    ("eca_resnet33ts", 64, "ECA-ResNet"), ("cs3darknet_s", 64, "CSPDarkNet"),
    ("twins_svt_small", 64, "Twins"), ("tiny_vit_5m_224", 224, "TinyViT"),
]


def build(name: str, size: int, seed: int):
    import timm
    import torch

    torch.manual_seed(seed)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=5, img_size=size)
    except TypeError:  # no img_size argument
        model = timm.create_model(name, pretrained=False, num_classes=5)
    heads = model.get_classifier() if hasattr(model, "get_classifier") else ()
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)  # LeViT: (head, head_dist)
    with torch.no_grad():
        for head in heads:
            for p in head.parameters():
                if p.dim() > 1 and not p.any():
                    p.normal_(0.0, 0.02)
    return model


def main(argv: list[str] | None = None) -> None:
    zoo.main("benchmarks.timm_zoo", __doc__, MODELS, build, "timm_zoo", images=16, argv=argv)


if __name__ == "__main__":
    main()
