"""Manifests: a JSON file in every artifact directory that names its kind and hashes its files.

Loading verifies every listed file's sha256 before anything is read, so a truncated download or
a flipped bit is refused with the file's name instead of surfacing as garbage weights. Paths in
a manifest must stay inside their directory.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .errors import ArtifactError
from .fsutil import atomic_file, sha256_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("edgetune", "torch", "transformers", "bitsandbytes", "safetensors", "peft", "gguf"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def write_manifest(directory: str | os.PathLike, kind: str, payload: dict) -> dict:
    """Hash every file under ``directory`` (except the manifest) and write the manifest last."""
    directory = Path(directory)
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.name != MANIFEST:
            files[path.relative_to(directory).as_posix()] = sha256_file(path)
    manifest = {
        "format": f"edgetune.{kind}",
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
        **payload,
        "files": files,
    }
    with atomic_file(directory / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def _safe_member(directory: Path, rel: str) -> Path:
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or ".." in Path(rel).parts:
        raise ArtifactError(f"{directory / MANIFEST}: unsafe path {rel!r} in manifest")
    path = directory / rel
    if path.is_symlink() or not path.resolve().is_relative_to(directory.resolve()):
        raise ArtifactError(f"{directory / MANIFEST}: {rel!r} points outside its directory")
    return path


def read_manifest(directory: str | os.PathLike, kind: str | None = None, verify: bool = True) -> dict:
    """Read and verify a manifest; ``kind`` (e.g. "compiled") must match when given."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not an edgetune artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: corrupt manifest ({exc})") from None
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith("edgetune."):
        raise ArtifactError(f"{path}: not an edgetune manifest")
    found = manifest["format"].removeprefix("edgetune.")
    if kind is not None and found != kind:
        raise ArtifactError(f"{directory} is an edgetune {found}, not a {kind}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{path}: manifest has no file list")
    if verify:
        for rel, digest in files.items():
            member = _safe_member(directory, rel)
            if not member.is_file():
                raise ArtifactError(f"{member}: missing (listed in {MANIFEST})")
            if sha256_file(member) != digest:
                raise ArtifactError(f"{member}: checksum mismatch (corrupt or modified)")
    return manifest


def artifact_kind(directory: str | os.PathLike) -> str | None:
    """The kind of edgetune artifact at ``directory``, or None if it is not one."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        fmt = json.loads(path.read_text(encoding="utf-8")).get("format", "")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ArtifactError(f"{path}: corrupt manifest") from None
    return fmt.removeprefix("edgetune.") if isinstance(fmt, str) and fmt.startswith("edgetune.") else None
