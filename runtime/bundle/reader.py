"""Reading a deployment bundle: manifest, checksums, file paths. No torch here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from ..errors import CPMError
from .manifest import FORMAT, FORMAT_VERSION, Manifest, first_problem
from .onnx_external import OnnxFormatError, external_data_locations
from .verified import sha256_file, verify_files

MANIFEST = "manifest.json"
# The standard graphs every bundle holds, and the one data file they share (the exporter writes
# them; optimize builds variants and TensorRT engines from them).
FULL_GRAPH = "decoder.onnx"  # HF contract: logits for every position
GENERATION_GRAPH = "decoder_last.onnx"  # logits for the last position only
BASE_DATA = "decoder.onnx.data"
HF_CONFIG = "config.json"  # GPT-2 config beside decoder.onnx, for Hugging Face tools


class BundleError(CPMError, ValueError):
    """A bundle that is missing, corrupt, unsafe or of another format (one clear message)."""


MAX_MANIFEST_BYTES = 64 * 1024 * 1024


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "Bundle":
        """Read and check the manifest: schema, every named path inside the folder, sizes.

        ``verify`` also checks the sha256 of every file (recorded, so an unchanged file is not
        hashed again); generation verifies only the files of the graph it runs (``graph_files``).
        """
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"{path} is not a bundle folder (no such directory)")
        manifest_file = path / MANIFEST
        try:
            if manifest_file.stat().st_size > MAX_MANIFEST_BYTES:
                raise BundleError(f"{manifest_file} is over {MAX_MANIFEST_BYTES >> 20} MB: not a manifest")
            text = manifest_file.read_text(encoding="utf-8")
            manifest = json.loads(text)
        except FileNotFoundError:
            raise BundleError(f"{path} has no {MANIFEST}; is it a cpm-export bundle?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{manifest_file} is corrupt: {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{manifest_file} is not a {FORMAT} manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"bundle format version {manifest.get('format_version')!r} is not supported "
                              f"(this cpm-deploy reads version {FORMAT_VERSION}); re-export it")
        try:
            Manifest.model_validate_json(text)
        except ValidationError as e:
            raise BundleError(f"{manifest_file}: {first_problem(e)}") from None
        bundle = cls(path, manifest)
        bundle._check_references()
        bundle._check_files()
        if verify:
            bundle.verify(list(manifest["files"]))
        return bundle

    def _check_references(self) -> None:
        """Every file a graph, the tokenizer or an engine names is listed (and so checked)."""
        m, listed = self.manifest, self.manifest["files"]
        named = [(f"graphs.{k}.{f}", g.get(f)) for k, g in m["graphs"].items() for f in ("file", "data")]
        named += [(f"graphs.{k}.{twin}.{f}", g[twin].get(f)) for k, g in m["graphs"].items()
                  for twin in ("prefill", "score") if g.get(twin) for f in ("file", "data")]
        named += [(f"tokenizer.{f}", (m.get("tokenizer") or {}).get(f)) for f in ("file", "vocab")]
        named += [(f"engines.{k}.{f}", e.get(f)) for k, e in (m.get("engines") or {}).items()
                  for f in ("file", "timing_cache")]
        for field, name in named:
            if name is not None and name not in listed:
                raise BundleError(f"{self.path / MANIFEST}: field {field} names {name!r}, which is not among its files")
        if m.get("default_graph") is not None and m["default_graph"] not in m["graphs"]:
            raise BundleError(f"the manifest's default graph {m['default_graph']!r} is not among its graphs")

    def resolve(self, name: str) -> Path:
        """The path of a bundle file, refused if it (or a symlink on the way) leads out of the folder."""
        root = self.path.resolve()
        target = (self.path / name).resolve()
        if not target.is_relative_to(root):
            raise BundleError(f"bundle file {name} leads out of the bundle folder (to {target})")
        return target

    def _check_files(self) -> None:
        """Every listed file is inside the folder, a regular file, with the manifest's size."""
        for name, info in self.manifest["files"].items():
            f = self.resolve(name)
            if not f.is_file():
                raise BundleError(f"bundle file {name} is missing")
            if f.stat().st_size != info["bytes"]:
                raise BundleError(f"bundle file {name} has {f.stat().st_size} bytes, the manifest says {info['bytes']}")

    def verify(self, names: list[str]) -> list[str]:
        """Check the sha256 of the named files; returns those that had to be hashed (not recorded)."""
        files = {self.resolve(n): self.manifest["files"][n]["sha256"] for n in dict.fromkeys(names)}

        def mismatch(path: Path):
            raise BundleError(f"checksum mismatch for {path.relative_to(self.path.resolve())}: "
                              "the file is corrupt or was modified")

        return [str(p.relative_to(self.path.resolve())) for p in verify_files(files, mismatch)]

    def graph_files(self, variant: str, part: str = "generate") -> list[str]:
        """The files running ``variant`` reads: graph, weights, tokenizer; ``part="score"``: those of
        its scoring twin instead. The graphs' own external-data references are checked against the
        manifest here, before onnxruntime opens them."""
        graph = self.graph(variant)
        if part == "score":
            names = self._onnx_files(graph["score"]["file"])
        else:
            names = self._onnx_files(graph["file"])
            if graph.get("prefill"):
                names += self._onnx_files(graph["prefill"]["file"])
        return names + ([self.manifest["tokenizer"]["file"]] if self.manifest.get("tokenizer") else [])

    def _onnx_files(self, file: str) -> list[str]:
        """An ONNX graph and the data files it reads, each checked to be a file of the bundle."""
        inside = self.resolve(file)
        try:
            locations = external_data_locations(inside)
        except (OnnxFormatError, OSError) as e:
            raise BundleError(f"{file} is not a readable ONNX graph: {e}") from None
        for loc in sorted(locations):
            if loc not in self.manifest["files"] or (inside.parent / loc).resolve() != self.resolve(loc):
                raise BundleError(f"{file} reads its weights from {loc!r}, which is not a file of this bundle")
        return [file, *sorted(locations)]

    @property
    def config(self) -> dict:
        return self.manifest["model"]

    def graph(self, variant: str = "decoder") -> dict:
        graphs = self.manifest["graphs"]
        if variant not in graphs:
            raise BundleError(f"bundle has no graph {variant!r}; it has {', '.join(graphs) or 'none'}")
        return graphs[variant]

    def kv_bytes(self, variant: str) -> int:
        """Bytes per cached key or value element of a graph: 1 for an int8 cache, 2 fp16, 4 fp32."""
        g = self.graph(variant)
        dtype = g.get("kv_dtype") or ("fp16" if g.get("precision") == "fp16" else "fp32")
        return {"int8": 1, "fp16": 2}.get(dtype, 4)

    @property
    def default_graph(self) -> str:
        """The graph generation uses unless told otherwise (the manifest's choice)."""
        graphs = self.manifest["graphs"]
        return self.manifest.get("default_graph") or ("decoder_last" if "decoder_last" in graphs else next(iter(graphs)))

    @property
    def tokenizer_path(self) -> Path | None:
        tok = self.manifest.get("tokenizer")
        return self.resolve(tok["file"]) if tok else None


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
