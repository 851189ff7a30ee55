"""A dataset's identity: what a result was made from, recorded with the run and checked before it is reused.

The identity of a dataset (:class:`~gsema_fast.data.manifest.Manifest`) is its label map and, per case, its domain
and the image and label files it reads: their paths relative to the dataset folder, sizes, modification times and,
for files up to :data:`HASH_LIMIT` bytes, SHA-256 digests of their content. A run stores it in every checkpoint;
``--resume`` and ``lodo``'s reuse of finished runs compare it with the dataset they find
(:func:`identity_changes`). A file whose size and modification time are unchanged counts as unchanged without being
read again; one whose time changed (copied, touched) is read and compared by content where a digest was recorded.
A dataset moved to another folder keeps its identity.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gsema_fast.data.manifest import Manifest

# Files up to this size are hashed (a compressed volume of up to about 256^3 voxels: hashing a dataset of them takes
# seconds); larger ones are identified by size and modification time alone.
HASH_LIMIT = 64 * 2**20
IDENTITY_VERSION = 1
_SHOWN = 3  # examples named per kind of change


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_record(path: Path, base: Path, previous: Mapping[str, Any] | None) -> dict[str, Any]:
    st = path.stat()
    record = {"path": os.path.relpath(path, base), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": None}
    if previous is not None and previous.get("size") == st.st_size and previous.get("mtime_ns") == st.st_mtime_ns:
        record["sha256"] = previous.get("sha256")  # unchanged since it was recorded: not read again
    elif st.st_size <= HASH_LIMIT:
        record["sha256"] = _digest(path)
    return record


def dataset_identity(manifest: Manifest, previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The identity of ``manifest``'s dataset (plain types, for a checkpoint). ``previous``: an identity recorded
    before, whose digests are kept for files that have not changed since (no file is read twice)."""
    base = manifest.path.parent
    old_cases = (previous or {}).get("cases", {})
    cases = {}
    for case in manifest.cases:
        old = old_cases.get(case.name, {})
        entry: dict[str, Any] = {"domain": case.domain}
        for kind, path in (("image", case.image), ("label", case.label)):
            entry[kind] = None if path is None else _file_record(path, base, old.get(kind))
        cases[case.name] = entry
    return {"version": IDENTITY_VERSION, "labels": dict(manifest.labels), "cases": cases}


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _file_change(recorded: Mapping[str, Any] | None, path: Path | None, base: Path) -> str | None:
    """How a case's file differs from its record, or None when it is the same file."""
    if recorded is None or path is None:
        return None if recorded is None and path is None else "added" if recorded is None else "no longer given"
    where = os.path.relpath(path, base)
    if where != recorded["path"]:
        return f"now {where}, was {recorded['path']}"
    try:
        st = path.stat()
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if st.st_size != recorded["size"]:
        return f"rewritten ({recorded['size']} -> {st.st_size} bytes)"
    if st.st_mtime_ns == recorded["mtime_ns"]:
        return None
    if recorded.get("sha256") is None:
        return "modified since (same size; too large to have been hashed)"
    return None if _digest(path) == recorded["sha256"] else "rewritten (same size, other content)"


def identity_changes(recorded: Mapping[str, Any], manifest: Manifest) -> list[str]:
    """What differs between the dataset recorded as ``recorded`` (:func:`dataset_identity`) and ``manifest``'s,
    one short phrase per kind of change (cases added or removed, moved to another domain, files rewritten, another
    label map); [] when it is the same dataset."""
    if not isinstance(recorded, Mapping) or recorded.get("version") != IDENTITY_VERSION:
        return ["the recorded dataset identity is of an unknown format"]
    base = manifest.path.parent
    changes = []
    if dict(recorded["labels"]) != dict(manifest.labels):
        changes.append(f"label map {dict(recorded['labels'])} -> {dict(manifest.labels)}")
    old = recorded["cases"]
    now = {c.name: c for c in manifest.cases}
    added = [name for name in now if name not in old]
    removed = [name for name in old if name not in now]
    if added:
        changes.append(f"{len(added)} case(s) added ({_names(added)})")
    if removed:
        changes.append(f"{len(removed)} case(s) removed ({_names(removed)})")
    moved = [f"{n} {old[n]['domain']} -> {c.domain}" for n, c in now.items() if old.get(n, c)["domain"] != c.domain]
    if moved:
        changes.append(f"{len(moved)} case(s) moved to another domain ({_names(moved)})")
    for kind in ("image", "label"):
        files = []
        for name, case in now.items():
            if name in old:
                change = _file_change(old[name].get(kind), getattr(case, kind), base)
                if change is not None:
                    files.append(f"{name}: {change}")
        if files:
            changes.append(f"{len(files)} {kind} file(s) changed ({_names(files)})")
    return changes
