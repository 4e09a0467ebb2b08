"""Atomic, tamper-evident training checkpoints (safetensors + JSON, never pickle).

Layout inside ``runs/NAME/checkpoints/``::

    epoch-0003/model.safetensors   encoder / head / defense tensors, keys prefixed by part
    epoch-0003/optim.safetensors   optimiser state tensors (momentum buffers, ...)
    epoch-0003/optim-arl.safetensors  a defense's own optimiser (e.g. the ARL attacker's Adam)
    epoch-0003/state.json          epoch, metrics, scheduler state, sha256 of both files
    latest.json, best.json         {"tag": "epoch-0003"}, replaced atomically

A checkpoint directory is written under a temporary name and renamed into place, and the pointer
files are replaced with ``os.replace``, so killing training at any moment leaves the previous
checkpoint usable. Loading verifies the sha256 recorded in state.json before reading any tensor.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .edge.manifest import sha256_file
from .errors import QdefendError

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optim.safetensors"
STATE_FILE = "state.json"


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_lines_atomic(path: Path, lines: list[str]) -> None:
    """Replace a text file by ``lines`` (one per line) atomically: a kill leaves the old or the new file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


TAG_RE = re.compile(r"epoch-\d{4,}")


def flatten_state(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{"encoder": sd, "head": sd}`` -> one flat dict of contiguous, unshared CPU tensors."""
    flat = {}
    for part, sd in parts.items():
        for k, v in sd.items():
            if torch.is_tensor(v):
                flat[f"{part}.{k}"] = v.detach().to("cpu").contiguous().clone()
    return flat


def split_state(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in flat.items():
        part, key = k.split(".", 1)
        parts.setdefault(part, {})[key] = v
    return parts


def optimizer_to_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON metadata."""
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for k, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = k.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _extra_optim_file(name: str) -> str:
    return f"optim-{name}.safetensors"


def _save_optimizer(sd: dict, folder: Path, fname: str, files: dict[str, str]) -> dict:
    """Write one optimizer's tensors to ``folder/fname``, record its sha256 in ``files``; its JSON meta."""
    tensors, meta = optimizer_to_tensors(sd)
    save_file(tensors, str(folder / fname))
    files[fname] = sha256_file(folder / fname)
    return meta


def save_checkpoint(
    ckpt_dir: Path,
    epoch: int,
    parts: dict[str, dict[str, torch.Tensor]],
    optimizer_state: dict | None,
    state: dict[str, Any],
    *,
    is_best: bool = False,
    keep: int = 2,
    extra_optimizers: dict[str, dict] | None = None,
) -> Path:
    """Write checkpoint ``epoch-NNNN`` atomically and point ``latest`` (and maybe ``best``) at it.

    ``extra_optimizers`` (name -> state dict) are the defenses' own optimizers; :func:`load_checkpoint`
    returns them in ``state["extra_optimizers"]``."""
    ckpt_dir = Path(ckpt_dir)
    tag = f"epoch-{epoch:04d}"
    final = ckpt_dir / tag
    tmp = ckpt_dir / f".{tag}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(flatten_state(parts), str(tmp / MODEL_FILE))
    files = {MODEL_FILE: sha256_file(tmp / MODEL_FILE)}
    state = dict(state)
    if optimizer_state is not None:
        state["optimizer_meta"] = _save_optimizer(optimizer_state, tmp, OPTIM_FILE, files)
    for name, sd in (extra_optimizers or {}).items():
        state.setdefault("extra_optimizer_meta", {})[name] = _save_optimizer(sd, tmp, _extra_optim_file(name), files)
    state["files"] = files
    state["epoch"] = epoch
    write_json_atomic(tmp / STATE_FILE, state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json_atomic(ckpt_dir / "latest.json", {"tag": tag})
    if is_best:
        write_json_atomic(ckpt_dir / "best.json", {"tag": tag})
    _prune(ckpt_dir, keep)
    return final


def _prune(ckpt_dir: Path, keep: int) -> None:
    protected = {resolve_tag(ckpt_dir, p) for p in ("latest", "best") if (ckpt_dir / f"{p}.json").exists()}
    epochs = sorted(p.name for p in ckpt_dir.glob("epoch-*") if p.is_dir())
    for name in epochs[: max(0, len(epochs) - keep)]:
        if name not in protected:
            shutil.rmtree(ckpt_dir / name, ignore_errors=True)


def resolve_tag(ckpt_dir: Path, which: str) -> str:
    """``latest`` / ``best`` -> ``epoch-NNNN``; an explicit tag is returned as is."""
    if which.startswith("epoch-"):
        return which
    ptr = Path(ckpt_dir) / f"{which}.json"
    if not ptr.is_file():
        raise QdefendError(f"no '{which}' checkpoint in {ckpt_dir}: train the run first with `qdefend train`")
    try:
        tag = json.loads(ptr.read_text())["tag"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError):
        tag = None
    if not isinstance(tag, str) or not TAG_RE.fullmatch(tag):
        found = sorted(p.name for p in Path(ckpt_dir).glob("epoch-*") if p.is_dir())
        fix = (f'write {{"tag": "{found[-1]}"}} into it (the newest checkpoint there)' if found
               else "retrain the run")
        raise QdefendError(f"{ptr} is corrupted (it must hold {{\"tag\": \"epoch-NNNN\"}}): {fix}")
    return tag


def _valid_state(state: Any) -> bool:
    """state.json as :func:`save_checkpoint` writes it: an epoch, the model file's digest (and a step,
    when training wrote it)."""
    if not isinstance(state, dict):
        return False
    files = state.get("files")
    ints = all(isinstance(state.get(k), int) and not isinstance(state.get(k), bool) and state[k] >= 0
               for k in ("epoch", "step") if k == "epoch" or k in state)
    return (ints and isinstance(files, dict) and MODEL_FILE in files
            and all(isinstance(k, str) and "/" not in k and isinstance(v, str) for k, v in files.items())
            and isinstance(state.get("metrics", {}), dict))


def has_checkpoint(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / "latest.json").is_file()


def load_checkpoint(ckpt_dir: Path, which: str = "latest", *, with_optimizer: bool = True):
    """Return ``(parts, optimizer_state_or_None, state)``; refuse a corrupted or tampered checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    tag = resolve_tag(ckpt_dir, which)
    d = ckpt_dir / tag
    hint = (
        f"delete {d} (and fix latest.json/best.json to name an earlier epoch-NNNN) or retrain"
    )
    try:
        state = json.loads((d / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise QdefendError(f"checkpoint {d} is unreadable or incomplete (state.json): {hint}") from None
    if not _valid_state(state):
        raise QdefendError(f"checkpoint {d} has a corrupted state.json (no epoch, step or file digests): {hint}")
    for fname, digest in state.get("files", {}).items():
        p = d / fname
        if not p.is_file() or sha256_file(p) != digest:
            raise QdefendError(f"checkpoint file {p} is corrupted or was modified (sha256 mismatch): {hint}")
    try:
        parts = split_state(load_file(str(d / MODEL_FILE)))
        opt = None
        if with_optimizer and OPTIM_FILE in state.get("files", {}):
            opt = optimizer_from_tensors(load_file(str(d / OPTIM_FILE)), state["optimizer_meta"])
        if with_optimizer:
            state["extra_optimizers"] = {
                name: optimizer_from_tensors(load_file(str(d / _extra_optim_file(name))), meta)
                for name, meta in state.get("extra_optimizer_meta", {}).items()}
    except (SafetensorError, OSError) as e:
        raise QdefendError(f"checkpoint {d} cannot be read ({e}): {hint}") from None
    return parts, opt, state
