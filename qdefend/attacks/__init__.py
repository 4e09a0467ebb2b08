"""Attacks on split models, imported as ``qdefend.attacks``.

Layout (one module per attack, grouped by family, as ART does)::

    base.py          Attack, AttackResult, AttackError, CAPABILITIES, ATTACKS registry, build_attack
    targets.py       Target kinds (torch float/int8, ONNX Runtime, LiteRT, service) and open_target
    metrics.py       MSE / PSNR / SSIM, mean-image baseline, bootstrap CIs, oracle accuracy
    inversion/       decoder (black box), rmle (white box), shadow (query-free), clone (extract then invert)
    extraction/      model extraction from service answers (KnockoffNets, Copycat, JBDA)
    repurposing.py   unintended classifiers trained on released features
    runner.py        one attack on one target -> runs/NAME/attacks/ATTACK-TARGET.json + .png (qdefend attack)
    report.py        float vs int8 on every run -> report.md, report.json, figures (qdefend compare)
    grid.py          PNG grids of originals and reconstructions

Typical use::

    from qdefend.attacks import build_attack, open_target
    from qdefend.run import load_run
    run = load_run("runs/full")
    target = open_target("runs/full", "encoder.int8.tflite", run=run)
    result = build_attack("decoder").run(target, run.data, seed=0)
    result.save("runs/full/attacks/decoder-encoder.int8.tflite.json")

or, as ``qdefend attack`` does it, ``attack_run("runs/full", "encoder.int8.tflite", "decoder")``.
"""

from __future__ import annotations


from .base import ATTACKS, CAPABILITIES, Attack, AttackError, AttackResult, build_attack
from .targets import TARGET_KINDS, RuntimeTarget, ServiceTarget, Target, TorchTarget, open_target, target_specs
from . import extraction, inversion, repurposing  # noqa: F401  (each registers its attacks)

__all__ = [
    "ATTACKS", "CAPABILITIES", "TARGET_KINDS", "Attack", "AttackError", "AttackResult", "Target",
    "TorchTarget", "RuntimeTarget", "ServiceTarget", "build_attack", "open_target", "target_specs",
]
