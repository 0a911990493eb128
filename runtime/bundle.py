"""Reading a deployment bundle: manifest, checksums, file paths. No torch here."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

FORMAT = "cpm-deploy-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# The standard graphs every bundle holds, and the one data file they share (the exporter writes
# them; optimize builds variants and TensorRT engines from them).
FULL_GRAPH = "decoder.onnx"  # HF contract: logits for every position
GENERATION_GRAPH = "decoder_last.onnx"  # logits for the last position only
BASE_DATA = "decoder.onnx.data"


class BundleError(ValueError):
    """A bundle that is missing, corrupt or of another format (one clear message)."""


def sha256_file(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "Bundle":
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"{path} is not a bundle folder (no such directory)")
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise BundleError(f"{path} has no {MANIFEST}; is it a cpm-export bundle?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{path / MANIFEST} is corrupt: {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{path / MANIFEST} is not a {FORMAT} manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"bundle format version {manifest.get('format_version')} is not supported "
                              f"(this cpm-deploy reads version {FORMAT_VERSION}); re-export it")
        bundle = cls(path, manifest)
        bundle.check_files(full=verify)
        return bundle

    def check_files(self, full: bool = True) -> None:
        """Every listed file exists with its size; with full, its sha256 too."""
        for name, info in self.manifest.get("files", {}).items():
            f = self.path / name
            if not f.is_file():
                raise BundleError(f"bundle file {name} is missing")
            if f.stat().st_size != info["bytes"]:
                raise BundleError(f"bundle file {name} has {f.stat().st_size} bytes, the manifest says {info['bytes']}")
            if full and sha256_file(f) != info["sha256"]:
                raise BundleError(f"checksum mismatch for {name}: the file is corrupt or was modified")

    @property
    def config(self) -> dict:
        return self.manifest["model"]

    def graph(self, variant: str = "decoder") -> dict:
        graphs = self.manifest.get("graphs", {})
        if variant not in graphs:
            raise BundleError(f"bundle has no graph {variant!r}; it has {', '.join(graphs) or 'none'}")
        return graphs[variant]

    @property
    def default_graph(self) -> str:
        """The graph generation uses unless told otherwise (the manifest's choice)."""
        graphs = self.manifest.get("graphs", {})
        name = self.manifest.get("default_graph") or ("decoder_last" if "decoder_last" in graphs else "decoder")
        if name not in graphs:
            raise BundleError(f"the manifest's default graph {name!r} is not among its graphs")
        return name

    @property
    def tokenizer_path(self) -> Path | None:
        tok = self.manifest.get("tokenizer")
        return self.path / tok["file"] if tok else None


def update_manifest(folder: str | Path, change) -> dict:
    """Apply ``change(manifest)`` and rewrite manifest.json atomically (files added later, engines)."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    tmp = folder / f".{MANIFEST}.partial"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(folder / MANIFEST)
    return manifest


def file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
