"""Files that can be trusted: a manifest of sizes and checksums written at save time, and
the checks that name a missing, truncated or corrupted file in one line.

A saved directory (a checkpoint, a stage's final model or dataset) holds `manifest.json`:
`{relative path: {"size": bytes, "sha256": hex}}` of its binary data files (weights,
trainer state, dataset shards; the JSON files are checked by parsing them, and may be
edited by hand). Loading checks it first, so a file cut
by a full disk or a copy, or overwritten by anything else, is reported by name instead
of failing deep inside a loader. `model.safetensors` is also checked without a manifest:
its header states how long the file must be.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

from rlhf_toy.errors import UsageError

MANIFEST = "manifest.json"
# run records beside the saved files: they change after the save, so they are not listed
DATA_SUFFIXES = (".safetensors", ".pt", ".bin", ".arrow")
UNLISTED = {MANIFEST, ".lock", "metrics.jsonl", "run_config.json", "summary.json", "inspect",
            "sweep"}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _listed_files(directory: str) -> list[str]:
    names = []
    for root, dirs, files in os.walk(directory):
        rel_root = os.path.relpath(root, directory)
        if rel_root == ".":  # checkpoints and temporary saves have their own manifests
            dirs[:] = [d for d in dirs if d not in UNLISTED and not d.startswith(
                ("checkpoint-", ".tmp-", ".old-"))]
            files = [f for f in files if f not in UNLISTED and not f.startswith(".tmp-")]
        names += [os.path.normpath(os.path.join(rel_root, f)) for f in files
                  if f.endswith(DATA_SUFFIXES)]
    return sorted(names)


def write_manifest(directory: str) -> None:
    """Record the size and SHA-256 of every saved file under `directory` (flushed to disk)."""
    entries = {name: {"size": os.path.getsize(os.path.join(directory, name)),
                      "sha256": _sha256(os.path.join(directory, name))}
               for name in _listed_files(directory)}
    path = os.path.join(directory, MANIFEST)
    with open(path, "w") as fh:
        json.dump(entries, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def verify_manifest(directory: str, what: str) -> None:
    """Check every file `manifest.json` lists (if there is one): present, full size, same
    checksum. `what` names the directory in the error ("policy checkpoint 'x'")."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return
    try:
        with open(path) as fh:
            entries = json.load(fh)
        items = sorted(entries.items())
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise UsageError(f"{what}: {MANIFEST} is not a valid manifest (corrupted)") from None
    for name, entry in items:
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise UsageError(f"{what}: {name} is missing")
        size = os.path.getsize(file)
        if size != entry["size"]:
            raise UsageError(f"{what}: {name} is truncated or altered ({size} bytes, "
                             f"{entry['size']} when saved)")
        if _sha256(file) != entry["sha256"]:
            raise UsageError(f"{what}: {name} is corrupted (its checksum differs from the "
                             "one recorded when it was saved)")


def check_safetensors(file: str, what: str) -> None:
    """A `.safetensors` file whose header parses and whose length matches the header."""
    name = os.path.basename(file)
    size = os.path.getsize(file)
    try:
        with open(file, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise UsageError(f"{what}: {name} is not a readable safetensors file (truncated or "
                         "corrupted header)") from None
    if 8 + n + end != size:
        raise UsageError(f"{what}: {name} is truncated or altered ({size} bytes, its header "
                         f"needs {8 + n + end})")


def read_json_file(file: str, what: str) -> dict:
    """A JSON object from `file`, or a one-line error naming it."""
    try:
        with open(file) as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise UsageError(f"{what}: {os.path.basename(file)} is not valid JSON{line}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{what}: {os.path.basename(file)} must hold a JSON object")
    return data


def error_reason(exc: BaseException) -> str:
    """A short cause for a failed write: the OS error text, or the first line."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename): a crash never leaves half a file."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)
