"""Copycat CNN: steal a classifier's function from its top-1 labels alone.

The attacker labels its own images with the service's hard answers and trains a clone with
cross-entropy on them (one-hot targets through the shared soft cross-entropy). The original work
queried with natural images from outside the problem domain (ImageNet for facial expressions);
here the query pool is by default the attacker's split of the victim's distribution (``pool``,
see ``common``), the setting of its problem-domain variant, and ``pool=mnist5k`` (a transfer set
from outside the victim's data set) the original's setting. Queries are drawn as KnockoffNets'
random policy draws them, so copycat vs knockoff isolates what probabilities add over labels.

Paper: Correia-Silva, Berriel, Badue, de Souza, Oliveira-Santos, "Copycat CNN: Stealing
Knowledge by Persuading Confession with Random Non-Labeled Data", IJCNN 2018 (arXiv 1806.05476).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base import ATTACKS
from .common import QUICK, ExtractionAttack, ExtractionConfig, query_random

__all__ = ["CopycatConfig", "CopycatAttack"]


@dataclass
class CopycatConfig(ExtractionConfig):
    """Copycat settings: the shared extraction settings (see ``common.ExtractionConfig``)."""

    attack_name: ClassVar[str] = "copycat"


class CopycatAttack(ExtractionAttack):
    """Copycat CNN: clone the service from its top-1 labels on the attacker's images."""

    name = "copycat"
    requires = frozenset({"labels"})
    config_cls = CopycatConfig
    presets = {"quick": QUICK}
    answer = "labels"

    def collect(self, oracle, pool, ctx):
        query_random(oracle, pool, oracle.budget)
        return {"policy": "random"}


ATTACKS.register(help="Copycat CNN extraction from hard labels on the attacker's images")(CopycatAttack)
