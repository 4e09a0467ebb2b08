"""The cloud half of split inference: ``qdefend serve RUN`` answers int8 features with the run's head.

:mod:`.service` holds what the server knows (the manifest, the head artifact, the checks every
request passes) without any web framework; :mod:`.app` puts it behind FastAPI + uvicorn, with
authentication, size limits, Prometheus metrics and the phone-browser page in :mod:`web`.
The wire format itself is :mod:`qdefend.edge.wire` (the device side uses the same file).

Paper: Vepakomma et al., "Split learning for health: Distributed deep learning without sharing raw
patient data" (2018): the client holds the first layers, the server the rest; only the cut
layer's activations travel.
"""
