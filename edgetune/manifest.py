"""Manifests: a JSON file in every artifact directory that names its kind and hashes its files.

Loading verifies every listed file's sha256 before anything is read, so a truncated download or
a flipped bit is refused with the file's name instead of surfacing as garbage weights. Paths in
a manifest must stay inside their directory: no absolute paths, no ``..``, no symlinks (a symlink
is never followed, even one that points inside). The files a loader reads for a kind (see
:data:`REQUIRED_FILES`) must be listed, so dropping an entry does not skip its check.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path, PurePosixPath, PureWindowsPath

from .errors import ArtifactError
from .fsutil import atomic_file, sha256_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is a few KiB; refuse to parse something absurd

# What each kind's loader reads: these must be in the manifest's file list.
REQUIRED_FILES = {
    "compiled": ("config.json", "base.safetensors", "trainable.safetensors"),
    "run": ("trainable.safetensors",),
    "adapter": ("adapter_config.json", "adapter_model.safetensors"),
    "checkpoint": ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"),
}


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
    """Hash every file under ``directory`` (except the manifest) and write the manifest last.

    Symlinks are not listed (and a loader refuses them), nor hidden files (temporaries, locks).
    """
    directory = Path(directory)
    files = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts):  # temporaries of atomic writes, lock files
            continue
        if path.is_file() and not path.is_symlink() and rel.as_posix() != MANIFEST:
            files[rel.as_posix()] = sha256_file(path)
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


def _short(value, limit: int = 80) -> str:
    try:
        text = repr(value)
    except RecursionError:  # pragma: no cover - JSON nesting is bounded by the parser's own limit
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "…"


def safe_member(directory: Path, rel) -> Path:
    """``directory / rel`` if ``rel`` is a plain relative path that stays inside and crosses no symlink."""
    where = directory / MANIFEST
    if (not isinstance(rel, str) or not rel or "\0" in rel or "\\" in rel or len(rel) > 4096
            or PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).drive or PureWindowsPath(rel).root):
        raise ArtifactError(f"{where}: unsafe path {_short(rel)} in manifest")
    parts = PurePosixPath(rel).parts
    if any(p in ("..", ".") for p in parts) or rel.endswith("/") or "//" in rel:
        raise ArtifactError(f"{where}: unsafe path {_short(rel)} in manifest")
    path = directory
    try:
        for part in parts:
            path = path / part
            if path.is_symlink():
                raise ArtifactError(f"{where}: {_short(rel)} is a symlink (refused, even inside the directory)")
        if not path.resolve().is_relative_to(directory.resolve()):
            raise ArtifactError(f"{where}: {_short(rel)} points outside its directory")
    except OSError as exc:
        raise ArtifactError(f"{where}: cannot check {_short(rel)} ({exc.strerror or exc})") from None
    return path


_safe_member = safe_member  # the old private name


def _load_json(path: Path) -> object:
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{path}: corrupt manifest (larger than {MAX_MANIFEST_BYTES >> 20} MiB)")
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path}: corrupt manifest (invalid UTF-8 at byte {exc.start})") from None
    except RecursionError:
        raise ArtifactError(f"{path}: corrupt manifest (nested too deeply)") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: corrupt manifest ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except ValueError as exc:  # e.g. an integer beyond Python's digit limit
        raise ArtifactError(f"{path}: corrupt manifest ({str(exc).splitlines()[0][:120]})") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read manifest ({exc.strerror or exc})") from None


def read_manifest(directory: str | os.PathLike, kind: str | None = None, verify: bool = True) -> dict:
    """Read and verify a manifest; ``kind`` (e.g. "compiled") must match when given."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not an edgetune artifact (no {MANIFEST})")
    manifest = _load_json(path)
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith("edgetune."):
        raise ArtifactError(f"{path}: not an edgetune manifest")
    found = fmt.removeprefix("edgetune.")
    if kind is not None and found != kind:
        raise ArtifactError(f"{directory} is an edgetune {_short(found, 40)}, not a {kind}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{path}: manifest has no file list")
    for rel, digest in files.items():
        if not isinstance(digest, str) or len(digest) != 64:
            raise ArtifactError(f"{path}: bad sha256 for {_short(rel)}")
    missing = [name for name in REQUIRED_FILES.get(found, ()) if name not in files]
    if missing:
        raise ArtifactError(f"{path}: {missing[0]} is not listed in the manifest")
    if verify:
        for rel, digest in files.items():
            member = safe_member(directory, rel)
            if not member.is_file():
                raise ArtifactError(f"{member}: missing (listed in {MANIFEST})")
            try:
                actual = sha256_file(member)
            except OSError as exc:
                raise ArtifactError(f"{member}: cannot read ({exc.strerror or exc})") from None
            if actual != digest.lower():
                raise ArtifactError(f"{member}: checksum mismatch (corrupt, truncated or modified)")
    return manifest


def artifact_kind(directory: str | os.PathLike) -> str | None:
    """The kind of edgetune artifact at ``directory``, or None if it is not one."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    manifest = _load_json(path)
    fmt = manifest.get("format", "") if isinstance(manifest, dict) else None
    if fmt is None:
        raise ArtifactError(f"{path}: corrupt manifest")
    return fmt.removeprefix("edgetune.") if isinstance(fmt, str) and fmt.startswith("edgetune.") else None
