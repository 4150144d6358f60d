"""fxzip's benchmarks: each one a module run from the repository root, its results written to
`benchmarks/results/` (the docs are generated from those files). `python -m benchmarks` lists them.

    python -m benchmarks.accuracy         the paper's protocol, settings (a)-(e): accuracy_<s>.*
    python -m benchmarks.corrections      each label-free correction alone: corrections_<s>.md
    python -m benchmarks.width            merged widths between one model's and both: width.*, cca.*
    python -m benchmarks.multi_task       four models, four tasks, one merge: multi_task.*
    python -m benchmarks.five_tasks       five 2-class tasks merged into one narrow model: five_tasks.*
    python -m benchmarks.vit_digits       two small ViTs on the digit halves: vit_digits.*
    python -m benchmarks.data_free        merges without data against merges with data: data_free.*
    python -m benchmarks.scarce_data      joint accuracy against 4-1007 calibration samples: scarce_data.*
    python -m benchmarks.generator        two SinGAN-style generators merged into one: generator.*
    python -m benchmarks.bert_digits      two transformers BERTs on the digit halves: bert_digits.*
    python -m benchmarks.lm_text          two byte-level Llamas, English + Python, merged into one
                                          and written back as a transformers model: lm_text.*
    python -m benchmarks.speed            phases, statistics, matching, memory: 1_*-6_*, speed.md
    python -m benchmarks.speed --ratios   statistics and merge against plain forwards: 6_floor.*
    python -m benchmarks.scale            one process vs torch.distributed ranks: scale.*
    python -m benchmarks.memory           ViT-B/16 and 0.25B/1B decoders within memory_gib:
                                          memory.*, memory_ranks.*, memory_compare.*
    python -m benchmarks.timm_zoo         timm families: trace, zip, permuted self-merge: timm_zoo.*
    python -m benchmarks.torchvision_zoo  torchvision's families, the same: torchvision_zoo.*
    python -m benchmarks.hf_zoo           transformers families (tiny configs): hf_zoo.*

Every module takes `--help`; most take `--quick` or a size option for a short run and `--out DIR`.
The pieces they share (data, models, settings, training, evaluation, timing, tables, plots, the
zoo runner, the reference greedy) are in `benchmarks.common`.
"""
