"""Model extraction: train a clone of the service from its answers to the attacker's queries.

``knockoff`` (probabilities; random or adaptive class-bandit queries), ``copycat`` (top-1
labels), ``jbda`` (labels, Jacobian-augmented seed set) and ``fingerprint`` (PSML: map a served
model zoo's targets to its models, pin the best one, then KnockoffNets). Shared machinery (metered queries,
the query pool, clone network, training, fidelity) lives in ``common``. Each module registers
its attack in ``qdefend.attacks.base.ATTACKS`` on import.
"""

from __future__ import annotations

from .common import ExtractionAttack, ExtractionConfig, QueryOracle, QueryPool
from .copycat import CopycatAttack, CopycatConfig
from .fingerprint import FingerprintAttack, FingerprintConfig
from .jbda import JBDAAttack, JBDAConfig
from .knockoff import KnockoffAttack, KnockoffConfig

__all__ = [
    "ExtractionAttack", "ExtractionConfig", "QueryOracle", "QueryPool",
    "KnockoffAttack", "KnockoffConfig", "CopycatAttack", "CopycatConfig", "JBDAAttack", "JBDAConfig",
    "FingerprintAttack", "FingerprintConfig",
]
