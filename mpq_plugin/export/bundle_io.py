"""Write and read integer bundles: ``manifest.json``, ``layers/<name>.json``, ``arrays/*.npy``, README.

Integer tensors are stored with the smallest numpy integer dtype that holds them (``int8`` for
4-bit codes, ``uint8`` for unsigned ones, ...); the executor widens them to int64. The single
float array is ``output.unit`` (float64 real value of one output integer step, for reporting).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Union

import numpy as np

from mpq_plugin.export.intmath import as_smallest
from mpq_plugin.export.packing import pack_codes
from mpq_plugin.export.plan import FORMAT, Bundle
from mpq_plugin.export.readme import bundle_readme

PathLike = Union[str, Path]


def _safe(name: str) -> str:
    return name.replace("/", "_")


def write_bundle(bundle: Bundle, out_dir: PathLike, packed: bool = False) -> Path:
    """Write ``bundle`` under ``out_dir`` (created); returns the manifest path.

    ``packed``: also write each layer's weight codes as a bit-stream at their exact bit-width
    (``arrays/<layer>.weight.bin``, layout in :mod:`mpq_plugin.export.packing`); the layer JSON
    names it under ``weight.packed``.
    """
    out = Path(out_dir)
    (out / "layers").mkdir(parents=True, exist_ok=True)
    (out / "arrays").mkdir(exist_ok=True)
    files = {}
    for key, arr in bundle.arrays.items():
        data = arr if arr.dtype.kind == "f" else as_smallest(arr)
        rel = f"arrays/{_safe(key)}.npy"
        np.save(out / rel, data)
        files[key] = dict(path=rel, dtype=str(data.dtype), shape=list(data.shape))
    manifest = dict(copy.deepcopy(bundle.manifest), arrays=files)
    for name, info in bundle.layers.items():
        info = copy.deepcopy(info)
        if packed:
            wi = info["weight"]
            bipolar = wi["encoding"] == "bipolar"
            rel = f"arrays/{_safe(name)}.weight.bin"
            (out / rel).write_bytes(pack_codes(bundle.arrays[wi["file"]], wi["bits"], wi["signed"], bipolar))
            wi["packed"] = dict(path=rel, bits_per_code=1 if bipolar else wi["bits"], order="C, LSB first",
                                count=int(np.prod(wi["shape"])), bipolar=bipolar)
        (out / "layers" / f"{_safe(name)}.json").write_text(json.dumps(info, indent=2))
    for entry in manifest["graph"]:
        if "layer" in entry:
            entry["layer"] = f"layers/{_safe(entry['name'])}.json"
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2))
    (out / "README.md").write_text(bundle_readme(bundle, files))
    return path


def read_bundle(out_dir: PathLike) -> Bundle:
    """Load a bundle written by :func:`write_bundle` (integer arrays widened to int64)."""
    out = Path(out_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{out} is not an mpq integer bundle (format={manifest.get('format')!r})")
    arrays = {}
    for key, meta in manifest.pop("arrays").items():
        a = np.load(out / meta["path"])
        arrays[key] = a if a.dtype.kind == "f" else a.astype(np.int64)
    layers = {e["name"]: json.loads((out / e["layer"]).read_text()) for e in manifest["graph"] if "layer" in e}
    return Bundle(manifest=manifest, layers=layers, arrays=arrays)
