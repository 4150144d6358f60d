"""What several benchmarks share (imported, never run):

- `data`: the settings' data (scikit-learn digits, mnist1d, the held-out validation split, the
  calibration batches);
- `models`: the settings' small model definitions (VGG-style CNN, 1-D CNN, the digits ViT);
- `settings`: the accuracy protocol's settings (a)-(e) and their stop points;
- `training`: training a setting's model pair, a cache of trained pairs, BN-reset copies;
- `evaluation`: joint / per-task accuracy of merged models, ensembles and single models;
- `rows`: the accuracy protocol's result rows, their mean ± std summaries and table cells;
- `cases`: two models of one architecture and their calibration batches (speed, scale);
- `timing`: wall-clock, CPU-time and peak-memory measuring helpers;
- `tables`: markdown / CSV / terminal tables;
- `plots`: joint accuracy against FLOPs plots;
- `zoo`: the model-zoo runner (timm_zoo, torchvision_zoo);
- `hf_families`: the transformers families and their tiny configs (hf_zoo);
- `reference_zipit`: the paper's plain O(D³) ZipIt! greedy, an oracle for tests and speed;
- `decoders`: plain-torch Llama-style decoders (the memory benchmark);
- `singan`: SinGAN-style multi-scale generators, their training and the photographs (generator).
"""
