"""l_p normalization: Santurkar, Tsipras, Ilyas and Madry's alternatives to
BN ("How Does Batch Normalization Help Optimization?", NeurIPS 2018,
section 3.3), which centre each feature and divide by its average l_p
magnitude instead of its standard deviation, for p = 1, 2 and infinity.

In train mode, per feature over the batch (as BN reduces):

    y = scale * (x - mean) / sqrt(s^2 + epsilon) + bias,
    s = (E|x|^p)^(1/p)   (p = 1, 2),     s = max |x|   (p = inf),

with s taken on the values before the mean is taken off. Unlike BN, the
output's variance is not fixed (for p = 2, s^2 = var + mean^2, so the
output's variance is var / (var + mean^2)); the paper uses these layers to
ask whether smoothing the landscape needs BN's fixed moments. The paper
states the scheme in one sentence; this is our reading of it, and the layer
is bnjax's `BatchNorm` in every other respect: running averages of mean and
s^2 (kept as "mean" and "var") for eval mode, flax's variables, ghost
batches, masks, `axis_name`. Batch Renorm and the unbiased running variance
(both defined on the standard deviation) are refused.
"""

from __future__ import annotations

import math

from bnjax.bn.batchnorm import BatchNorm

L_P = (1, 2, math.inf)


class LpBatchNorm(BatchNorm):
    """`BatchNorm` normalizing by each feature's average l_p magnitude (module doc)."""

    p: float = 2

    def __post_init__(self):
        if isinstance(self.p, bool) or self.p not in L_P:
            raise ValueError(f"p must be 1, 2 or math.inf (the l_p norms of Santurkar et al.), got {self.p!r}")
        if self.renorm is not None or self.unbiased_running_var:
            name = "renorm" if self.renorm is not None else "unbiased_running_var"
            raise ValueError(f"{name} is defined on the standard deviation; l_p normalization (p={self.p}) "
                             "does not take it")
        super().__post_init__()
