"""The code that runs on the device: the standard library and numpy only, no torch.

Modules: ``manifest`` (the run manifest: what an exported artifact is, how to feed it, what it
releases, and its validation), ``runtime`` (:class:`~qdefend.edge.runtime.Runtime`: open an
artifact against its manifest and encode images into the features a device sends) and ``runner``
(the standalone device CLI: encode / --bench / --check). ``qdefend bundle`` copies these files as
they are into a device bundle, so they import nothing from the rest of qdefend; the host tools
that make and ship bundles live in :mod:`qdefend.devices`.
"""
