"""Artifacts and their manifests: what made a file, from what, and whether it is whole.

Every stage writes ``manifest.json`` into its output folder. Readers call
:func:`read_manifest` with what they expect (kind, embedding size, backbone fingerprint) and
get a clear :class:`IncompatibleArtifact` *before* any work when it does not fit, or when a
file listed in the manifest is missing, truncated or changed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lblctl import __version__
from lblctl.core.errors import IncompatibleArtifact, LblError
from lblctl.core.journal import atomic_open  # noqa: F401 - re-exported: the one atomic writer lives in journal

MANIFEST = "manifest.json"
FULL_HASH_LIMIT = 256 << 20  # files above this get a sampled fingerprint (size + head/middle/tail)
_CHUNK = 1 << 20


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def fingerprint_file(path: str | os.PathLike) -> str:
    """A content fingerprint: sha256 of the whole file, or of size + three 1 MiB samples above
    256 MiB (a multi-GB store is not re-read at every stage; truncation still shows in the size)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: fh.read(_CHUNK), b""):
                h.update(block)
            return "sha256:" + h.hexdigest()
        h.update(str(size).encode())
        for offset in (0, size // 2, size - _CHUNK):
            fh.seek(offset)
            h.update(fh.read(_CHUNK))
    return "sha256s:" + h.hexdigest()


def describe_file(path: str | os.PathLike, root: str | os.PathLike | None = None) -> dict[str, Any]:
    path = Path(path)
    name = str(path.relative_to(root)) if root is not None else str(path)
    return {"path": name, "bytes": path.stat().st_size, "fingerprint": fingerprint_file(path)}


def write_manifest(
    out_dir: str | os.PathLike,
    kind: str,
    *,
    params: dict[str, Any] | None = None,
    inputs: dict[str, Any] | None = None,
    files: Iterable[str | os.PathLike] = (),
    embedding_size: int | None = None,
    backbone_fingerprint: str | None = None,
    extra: dict[str, Any] | None = None,
    command: list[str] | None = None,
    filename: str = MANIFEST,
) -> dict[str, Any]:
    """Write ``out_dir/manifest.json`` describing the artifact; ``files`` are relative to out_dir.

    ``filename``: another name, for a manifest beside one that is already there (a store's index)
    or for a file artifact in a folder shared with others (``SCORES.manifest.json``)."""
    out_dir = Path(out_dir)
    manifest: dict[str, Any] = {
        "kind": kind,
        "lblctl_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command if command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]],
        "params": params or {},
        "inputs": inputs or {},
        "embedding_size": embedding_size,
        "backbone_fingerprint": backbone_fingerprint,
        "files": [describe_file(out_dir / f, out_dir) for f in files],
    }
    if extra:
        manifest.update(extra)
    atomic_write_json(out_dir / filename, manifest)
    return manifest


def describe_input(path: str | os.PathLike) -> dict[str, Any]:
    """Path + fingerprint of an input: a file's content hash, or a folder's manifest fingerprint."""
    path = Path(path)
    entry: dict[str, Any] = {"path": str(path.resolve())}
    if path.is_file():
        entry["fingerprint"] = fingerprint_file(path)
    elif (path / MANIFEST).is_file():
        entry["fingerprint"] = fingerprint_file(path / MANIFEST)
        with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
            entry["kind"] = json.loads((path / MANIFEST).read_text()).get("kind")
    return entry


def read_manifest(
    folder: str | os.PathLike,
    *,
    kind: str | Iterable[str] | None = None,
    embedding_size: int | None = None,
    backbone_fingerprint: str | None = None,
    verify_files: bool = True,
) -> dict[str, Any]:
    """Read and check a manifest; raise :class:`IncompatibleArtifact` naming what is wrong."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not folder.exists():
        raise LblError(f"{folder}: no such folder")
    if not mpath.is_file():
        raise IncompatibleArtifact(f"{folder}: no {MANIFEST}; is this an lblctl output folder?")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IncompatibleArtifact(f"{mpath}: unreadable manifest ({exc}); re-run the stage that made it") from None
    if not isinstance(manifest, dict) or "kind" not in manifest:
        raise IncompatibleArtifact(f"{mpath}: not an lblctl manifest (no 'kind')")
    if kind is not None:
        kinds = {kind} if isinstance(kind, str) else set(kind)
        if manifest["kind"] not in kinds:
            raise IncompatibleArtifact(
                f"{folder}: is a '{manifest['kind']}' artifact, expected {' or '.join(sorted(kinds))}"
            )
    check_compatible(str(folder), manifest, embedding_size, backbone_fingerprint)
    if verify_files:
        verify_manifest_files(folder, manifest)
    return manifest


def check_compatible(
    what: str,
    meta: dict[str, Any],
    embedding_size: int | None = None,
    backbone_fingerprint: str | None = None,
) -> None:
    have = meta.get("embedding_size")
    if embedding_size is not None and have is not None and int(have) != int(embedding_size):
        raise IncompatibleArtifact(
            f"{what}: embedding size {have} does not match the expected {embedding_size}; "
            "use a backbone and store made together"
        )
    have_fp = meta.get("backbone_fingerprint")
    if backbone_fingerprint is not None and have_fp and have_fp != backbone_fingerprint:
        raise IncompatibleArtifact(
            f"{what}: made by another backbone ({have_fp[:19]}…, expected {backbone_fingerprint[:19]}…); "
            "re-imprint the store with this backbone"
        )


def verify_manifest_files(folder: str | os.PathLike, manifest: dict[str, Any], full: bool = False) -> None:
    """Check every listed file exists with its recorded size (and hash when ``full``)."""
    folder = Path(folder)
    for entry in manifest.get("files", []):
        p = folder / entry["path"]
        if not p.is_file():
            raise IncompatibleArtifact(f"{p}: listed in {folder / MANIFEST} but missing")
        size = p.stat().st_size
        if size != entry.get("bytes", size):
            raise IncompatibleArtifact(
                f"{p}: {size} bytes but the manifest says {entry['bytes']} (truncated or changed); "
                "re-run the stage that made it"
            )
        if full and fingerprint_file(p) != entry.get("fingerprint"):
            raise IncompatibleArtifact(f"{p}: content differs from its manifest fingerprint")
