"""Host tools for devices: device profiles, bundles (``qdefend bundle``), arm64 emulation and
deployment over ssh. What runs *on* the device is :mod:`qdefend.edge`."""
