"""Device profiles: the CPU, interpreter, threads and pip wheel platform of each edge target.

A profile tells ``qdefend bundle`` what to put in a device bundle (which int8 artifact, which
interpreter, which pinned ``requirements.txt``, which wheel platform tags for ``pip download``) and
the emulator (``devices/emulate.py``) which QEMU CPU stands in for it. Profiles are registered by name in
:data:`DEVICES` (``qdefend list devices``).

Wheel facts (PyPI, checked for CPython 3.11 with ``pip install --dry-run --platform ...``): ai-edge-litert
2.3.0 ships manylinux_2_27 wheels (x86_64, aarch64), onnxruntime 1.31.1 manylinux_2_28 ones, numpy
2.4.6 manylinux_2_27/2_28 and 1.26.4 manylinux2014. tflite-runtime 2.14.0 needs numpy < 2; its
aarch64 wheel is tagged manylinux_2_34 (glibc >= 2.34: Raspberry Pi OS bookworm has 2.36, older
images get none), its x86_64 one manylinux2014. So glibc 2.28 is the floor of every profile but the
Pis. Android is not a manylinux platform (bionic libc, no glibc): none of the three
interpreters has a pip wheel for it, so ``android-arm64`` bundles are refused with what to do
instead: ``--device phone-web`` (the int8 encoder in the phone's browser, onnxruntime-web's wasm
build), or the ``.tflite`` + ``manifest.json`` in a native app with LiteRT's Android runtime.
``phone-web`` is the one profile of kind ``browser``: no Python on the device, a static page.

Paper: Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-
Only Inference" (CVPR 2018): the int8 scheme the device interpreters (TFLite/XNNPACK, ONNX Runtime)
execute.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from qdefend.errors import QdefendError
from qdefend.registry import Registry

__all__ = ["DEVICES", "RUNTIMES", "RUNTIME_FORMAT", "WEB_RUNTIME", "REQUIREMENTS", "DeviceProfile", "get_profile",
           "list_profiles", "AARCH64_PLATFORMS", "X86_64_PLATFORMS"]

WEB_RUNTIME = "onnxruntime-web"  # the browser runtime of kind "browser" profiles (npm, wasm)
# Interpreter name (as qdefend/edge/runtime.py calls it) -> artifact format it runs.
RUNTIME_FORMAT = {"litert": "tflite", "tflite-runtime": "tflite", "onnxruntime": "onnx"}
RUNTIMES = tuple(RUNTIME_FORMAT)
# Pinned requirements.txt lines per interpreter; tflite-runtime 2.14.0 was built against numpy 1.x.
REQUIREMENTS = {
    "litert": ("ai-edge-litert==2.3.0", "numpy==2.4.6"),
    "tflite-runtime": ("tflite-runtime==2.14.0", "numpy==1.26.4"),
    "onnxruntime": ("onnxruntime==1.31.1", "numpy==2.4.6"),
}
_MANYLINUX = ("manylinux_2_17", "manylinux2014", "manylinux_2_27", "manylinux_2_28", "manylinux_2_34")
AARCH64_PLATFORMS = tuple(f"{t}_aarch64" for t in _MANYLINUX)
X86_64_PLATFORMS = tuple(f"{t}_x86_64" for t in _MANYLINUX)
_NO_2_34 = "its wheel is tagged manylinux_2_34 (needs glibc >= 2.34)"


@dataclass(frozen=True)
class DeviceProfile:
    """One edge target. ``wheels`` lists the interpreters that have a pip wheel for
    ``python_tag`` on ``platforms``; ``no_wheels`` says why each other one has none."""

    name: str
    description: str
    cpu: str
    arch: str  # aarch64 | x86_64
    qemu_cpu: str | None  # QEMU -cpu that stands in for it (None: runs natively on the host)
    runtime: str  # preferred interpreter
    format: str  # preferred artifact format (tflite | onnx)
    threads: int
    os: str
    glibc: str | None  # None: no glibc (Android's bionic)
    memory_mb: int  # memory budget for the encoder process
    python_tag: str = "cp311"
    platforms: tuple[str, ...] = ()  # pip --platform tags, oldest first
    wheels: tuple[str, ...] = ()  # interpreters with a pip wheel here
    no_wheels: dict[str, str] = field(default_factory=dict)  # interpreter -> why it has none
    advice: str = ""  # what to do when no interpreter has wheels
    kind: str = "python"  # python: runner.py + a pip interpreter; browser: a static page (phone-web)

    def __post_init__(self):
        if self.kind == "browser":
            if (self.runtime, self.format, self.arch) != (WEB_RUNTIME, "onnx", "wasm32"):
                raise QdefendError(f"device {self.name}: a browser profile runs {WEB_RUNTIME} on .onnx (wasm32)")
            return
        if self.kind != "python":
            raise QdefendError(f"device {self.name}: kind must be python or browser, got {self.kind!r}")
        if self.arch not in ("aarch64", "x86_64"):
            raise QdefendError(f"device {self.name}: arch must be aarch64 or x86_64, got {self.arch!r}")
        for r in (self.runtime, *self.wheels, *self.no_wheels):
            if r not in RUNTIME_FORMAT:
                raise QdefendError(f"device {self.name}: unknown runtime {r!r}; valid: {', '.join(RUNTIMES)}")
        if RUNTIME_FORMAT[self.runtime] != self.format:
            raise QdefendError(f"device {self.name}: runtime {self.runtime} runs .{RUNTIME_FORMAT[self.runtime]}, "
                               f"not .{self.format}")
        if self.threads < 1 or self.memory_mb < 1:
            raise QdefendError(f"device {self.name}: threads and memory_mb must be >= 1")

    @property
    def python_version(self) -> str:
        """"3.11" for cp311: what pip download --python-version takes."""
        digits = self.python_tag.removeprefix("cp")
        return f"{digits[0]}.{digits[1:]}"

    def choose(self, fmt: str | None = None, runtime: str | None = None) -> tuple[str, str]:
        """(format, runtime) for a bundle: the profile's preference, narrowed by what was asked.

        Raises QdefendError (one line, naming what to pick instead) for an unknown runtime or
        format, a runtime that cannot run the format, or a runtime without wheels here."""
        if not self.wheels:
            why = "; ".join(dict.fromkeys(self.no_wheels.values())) or "none published"
            raise QdefendError(f"{self.name} has no pip wheels for any interpreter ({why}): {self.advice}")
        if fmt is not None and fmt not in ("tflite", "onnx"):
            raise QdefendError(f"unknown format {fmt!r}: use --format tflite or --format onnx")
        if runtime is not None and runtime not in RUNTIME_FORMAT:
            raise QdefendError(f"unknown runtime {runtime!r}; valid runtimes: {', '.join(RUNTIMES)}")
        if runtime is not None and fmt is not None and RUNTIME_FORMAT[runtime] != fmt:
            others = [r for r in self.wheels if RUNTIME_FORMAT[r] == fmt]
            raise QdefendError(f"{runtime} runs .{RUNTIME_FORMAT[runtime]} files, not .{fmt}: use --format "
                               f"{RUNTIME_FORMAT[runtime]}" + (f" or --runtime {others[0]}" if others else ""))
        if runtime is not None and runtime not in self.wheels:
            same = [r for r in self.wheels if RUNTIME_FORMAT[r] == RUNTIME_FORMAT[runtime]]
            pick = (same or list(self.wheels))[0]
            why = self.no_wheels.get(runtime, "no wheel for this platform")
            raise QdefendError(f"{runtime} has no {self.python_tag} wheel for {self.name} ({why}): use "
                               f"--runtime {pick}" + ("" if same else f" --format {RUNTIME_FORMAT[pick]}"))
        if runtime is None:
            fmt = fmt or self.format
            choices = [r for r in (self.runtime, *self.wheels) if r in self.wheels and RUNTIME_FORMAT[r] == fmt]
            if not choices:
                raise QdefendError(f"no interpreter with wheels for {self.name} runs .{fmt}: use --format "
                                   f"{RUNTIME_FORMAT[self.wheels[0]]}")
            runtime = choices[0]
        return RUNTIME_FORMAT[runtime], runtime

    def requirements(self, runtime: str) -> list[str]:
        """Pinned requirements.txt lines for `runtime` on this device."""
        self.choose(runtime=runtime)
        return list(REQUIREMENTS[runtime])

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["platforms"], d["wheels"] = list(self.platforms), list(self.wheels)
        return d


DEVICES: Registry[DeviceProfile] = Registry("device")


def _register(p: DeviceProfile) -> DeviceProfile:
    DEVICES.register(help=p.description)(p)
    return p


_register(DeviceProfile(
    name="rpi4", description="Raspberry Pi 4 (Cortex-A72), 64-bit Raspberry Pi OS bookworm, LiteRT int8",
    cpu="Cortex-A72 (ARMv8-A, 4 cores, 1.5-1.8 GHz)", arch="aarch64", qemu_cpu="cortex-a72",
    runtime="litert", format="tflite", threads=4, os="Raspberry Pi OS bookworm 64-bit (Debian 12)",
    glibc="2.36", memory_mb=512, platforms=AARCH64_PLATFORMS,
    wheels=("litert", "onnxruntime", "tflite-runtime")))
_register(DeviceProfile(
    name="rpi5", description="Raspberry Pi 5 (Cortex-A76), 64-bit Raspberry Pi OS bookworm, LiteRT int8",
    cpu="Cortex-A76 (ARMv8.2-A with dot product, 4 cores, 2.4 GHz)", arch="aarch64", qemu_cpu="cortex-a76",
    runtime="litert", format="tflite", threads=4, os="Raspberry Pi OS bookworm 64-bit (Debian 12)",
    glibc="2.36", memory_mb=1024, platforms=AARCH64_PLATFORMS,
    wheels=("litert", "onnxruntime", "tflite-runtime")))
_register(DeviceProfile(
    name="generic-aarch64", description="any 64-bit ARM Linux with glibc >= 2.28 (Debian 10+, Ubuntu 20.04+)",
    cpu="ARMv8-A (aarch64)", arch="aarch64", qemu_cpu="cortex-a72",
    runtime="litert", format="tflite", threads=2, os="glibc Linux (aarch64)", glibc="2.28", memory_mb=512,
    platforms=AARCH64_PLATFORMS[:4], wheels=("litert", "onnxruntime"),
    no_wheels={"tflite-runtime": f"{_NO_2_34}; bundle with --device rpi5 if the board has glibc >= 2.34"}))
_register(DeviceProfile(
    name="android-arm64", description="Android phone (arm64-v8a): no pip wheels, bundling refused with advice",
    cpu="ARMv8-A (arm64-v8a)", arch="aarch64", qemu_cpu=None,
    runtime="litert", format="tflite", threads=4, os="Android (bionic libc)", glibc=None, memory_mb=512,
    platforms=(), wheels=(),
    no_wheels={r: "PyPI has no Android wheel; manylinux wheels need glibc" for r in RUNTIMES},
    advice=("bundle with --device phone-web (the encoder runs in the phone's browser and talks to `qdefend "
            "serve`), or ship runs/NAME/artifacts/encoder.int8.tflite + manifest.json in an app with the LiteRT "
            "Android library (com.google.ai.edge.litert), or run a glibc Linux userland on the phone (e.g. "
            "Termux proot-distro debian) and bundle with --device generic-aarch64")))
_register(DeviceProfile(
    name="phone-web", description="any phone's browser with wasm SIMD: a static page runs the int8 ONNX encoder "
                                  "(onnxruntime-web), sends int8 features to qdefend serve",
    cpu="the phone's CPU through WebAssembly SIMD (Chrome 91+, Safari 16.4+, Firefox 89+)", arch="wasm32",
    qemu_cpu=None, runtime=WEB_RUNTIME, format="onnx", threads=1, os="any (browser)", glibc=None, memory_mb=256,
    kind="browser"))
_register(DeviceProfile(
    name="x86_64", description="64-bit x86 Linux with glibc >= 2.28, LiteRT int8 with XNNPACK",
    cpu="x86-64 (AVX2; AVX-512 VNNI where present)", arch="x86_64", qemu_cpu=None,
    runtime="litert", format="tflite", threads=4, os="glibc Linux (x86_64)", glibc="2.28", memory_mb=2048,
    platforms=X86_64_PLATFORMS[:4], wheels=("litert", "onnxruntime", "tflite-runtime")))


def get_profile(name: str | DeviceProfile) -> DeviceProfile:
    """The profile called `name` (unknown names list the valid ones)."""
    return name if isinstance(name, DeviceProfile) else DEVICES.get(name)


def list_profiles() -> list[DeviceProfile]:
    return [DEVICES.get(n) for n in DEVICES.names()]
