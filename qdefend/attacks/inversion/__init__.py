"""Model inversion: reconstruct the private input image from the released features.

One module per attack: ``decoder`` (black box, learned inverse network), ``gan`` (the decoder
refined against a WGAN-GP critic), ``rmle`` (white box,
optimisation), ``shadow`` (query-free, through the frozen cloud head) and ``clone`` (extract the
encoder from queries, then rMLE on the clone). All register in ``qdefend.attacks.ATTACKS``.
"""

from __future__ import annotations

from . import clone, decoder, gan, rmle, shadow  # noqa: F401  (each registers its attack)
