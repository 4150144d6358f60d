"""The op-rule table: how each op moves feature spaces between its inputs and its output (the
extension point). Importing this package fills the table; `fxzip.rules.api` is how a rule is
written and registered. Ops missing from the table are barriers as soon as a channel-carrying
tensor reaches them.

- `api`: the rule API — `register`, `rule_for`, `Context`, `Barrier`, `ParamHandle`
- `layout`: feature layouts — which spaces a tensor's channel axis holds, block by block
- `elementwise`: activations, arithmetic, dropout, expand/repeat, PReLU
- `layers`: Linear, convolutions (grouped, depthwise), Embedding, BatchNorm/LayerNorm/GroupNorm
- `spatial`: pooling, interpolation, padding, roll
- `reductions`: mean/sum/amax/std/var, vector norms, F.normalize, softmax
- `shapes`: reshape/view/flatten/squeeze, permute/transpose, shape queries
- `indexing`: getitem and slices, split/chunk/tensor_split, unbind
- `concat`: cat and stack
- `heads`: tensors split into attention heads (headed layouts, radix groups)
- `attention`: matmul/bmm, scaled_dot_product_attention, the fused attention ops
- `timm`: timm's layers (opt-in: `timm.register()`)
"""
from . import (attention, concat, elementwise, heads, indexing, layers,  # noqa: F401  each module
               reductions, shapes, spatial, timm)                        # registers its rules
