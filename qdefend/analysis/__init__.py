"""Where to cut a split model: partition analysis (GPZ), entropy estimates, layer similarity (KLAS).

Modules (import the one you need; nothing heavy is imported here)::

    radius.py      R_c^2 streaming accumulator, relative drops, Golden Partition Zone locator
    entropy.py     estimate of H(x | z~) under Gaussian feature noise and CEM's MSE bound
    similarity.py  KL between float and int8 representations, and between adjacent cuts
    partition.py   PartitionConfig + analyze_partition: everything per cut (``qdefend partition``)
    report.py      the rich table, JSON and PNG files of a partition analysis
    plot.py        matplotlib figures: line plots over a shared x axis, scatters, Pareto front
    seeds.py       results over training seeds: mean ± sample std per group, and its table cell

Paper: Liu et al., arXiv 2506.15412 (GPZ); Xia et al., arXiv 2503.00383 (CEM bound);
Sanyal et al., ICLR 2026 (KLAS).
"""

__all__ = ["radius", "entropy", "similarity", "partition", "report", "plot", "seeds"]
