"""The float32 tolerance every cross-layout comparison uses, derived once.

Two layouts of one step compute the same sums in a different order (per device, then across
devices; a pipeline's microbatches; a vocab split over tensor). float32 rounds each addition to
within u = 2^-24 ~ 6e-8 relative, and reassociating a sum of n terms of one sign moves it by about
sqrt(n) u on average and (n - 1) u at worst (Higham, "Accuracy and Stability of Numerical
Algorithms", 2nd ed., sec. 4.2). The longest chain in these tests' losses is the mean over
B T = 16 x 64 = 1,024 tokens of logsumexps over 128 logits of 64-term dot products: ~1e5 terms,
sqrt(1e5) u ~ 2e-5 at the extreme, ~1e-6 as measured (different CPUs' vector kernels: up to
1.25e-6). So 1e-5: above what reassociation does on any machine of this kind, and two orders of
magnitude below what a lost, doubled or misplaced reduction does (>= 1e-3: a factor 2 on one
device's share of 8 changes the loss by 1/8 of its value).
"""

RTOL = 1e-5  # losses, relative
GRAD_ATOL = 1e-5  # gradients: this times each tensor's largest entry (an elementwise relative error
# means nothing for entries that cancel to rounding)
