"""The audit record of an unlearning run (OUT/audit.json), and `fastforget verify`.

A record says what was done and measured, and lets a reviewer check that the files it names are
the ones it describes: the SHA-256 of the original and the unlearned checkpoint, the forget set
sample by sample (each image file's path and SHA-256, or the embedded digits' rows of
digits.csv.gz, whose own SHA-256 is kept), the retain or proxy set likewise, each with a digest
over its list, the settings and command, the times and the final losses of every part of the
run (a resumed run adds a part), and the evaluations that `eval --audit` adds. It certifies
nothing: it records.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from .errors import InvalidValue, MissingPath

KIND = "fastforget unlearning record"
RECORD = "audit.json"
SCOPE = ("This record lists what the run was given, what it did and what was measured. It does not certify "
         "that the data are forgotten: the evaluations (the paper's metrics and the membership-inference AUC) are "
         "the evidence, with their limits (see the README's Evidence section).")
HASH_THREADS = 8  # hashlib releases the GIL on large reads


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hashes(paths: list[str]) -> list[Optional[str]]:
    """Each file's SHA-256, or None where it cannot be read."""
    def one(path):
        try:
            return sha256_file(path)
        except OSError:
            return None
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        return list(pool.map(one, paths))


def list_digest(samples: list) -> str:
    """SHA-256 over a sample list's canonical JSON: an edit to the list shows."""
    return hashlib.sha256(json.dumps(samples, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def describe_set(data) -> dict:
    """A set's samples: image files by path and SHA-256, or the embedded digits by row."""
    if data.files is not None:
        paths = [os.path.abspath(f) for f in data.files]
        samples = [{"path": p, "sha256": h} for p, h in zip(paths, _hashes(paths))]
    else:
        samples = [int(r) for r in data.rows]
    return {"count": len(samples), "samples": samples, "digest": list_digest(samples)}


def _commit() -> str:
    from .bench.harness import commit

    return commit()


def _checkpoint(path: str) -> dict:
    return {"path": os.path.abspath(path), "sha256": sha256_file(path)}


def start(out: str, checkpoint: str, method: str, settings: dict, data_source: str, forget, retain) -> dict:
    """The record of a run about to train (hashing its checkpoint and files); begin() writes it."""
    from .data import DIGITS_CSV

    record = {"kind": KIND, "scope": SCOPE, "original": _checkpoint(checkpoint), "method": method,
              "settings": settings, "data": {"source": data_source}, "forget": describe_set(forget),
              "retain": describe_set(retain), "parts": [], "evaluations": []}
    if forget.files is None:
        record["data"]["digits_csv"] = _checkpoint(DIGITS_CSV)
    return record


def begin(record: dict, out: str, first_step: int) -> dict:
    """The run's part starting at first_step, written at once (a killed run leaves its start). A
    resumed run (first_step > 0) continues the record its earlier parts wrote, which must
    describe the same original and the same sets."""
    path = os.path.join(out, RECORD)
    if first_step > 0 and os.path.exists(path):
        earlier = load(path)
        for key in ("original", "forget", "retain"):
            if earlier[key] != record[key]:
                raise InvalidValue(f"--resume: {path} records another {key} ({key} set or checkpoint changed since "
                                   f"the run began); start in another --out")
        record = earlier
    from . import __version__

    record["parts"].append({"fastforget": __version__, "commit": _commit(), "command": sys.argv,
                            "started": now(), "from_step": first_step})
    write(record, path)
    return record


def finish(record: dict, out: str, metrics: dict) -> str:
    """The part's end (time, steps, final losses) and the unlearned checkpoint's hash, written."""
    ckpt = os.path.join(out, "checkpoint.pt")
    record["parts"][-1].update({"ended": now(), "to_step": metrics.get("step"),
                                "final": {k: v for k, v in metrics.items() if k.endswith("loss")}})
    record["unlearned"] = _checkpoint(ckpt)
    record["started"], record["ended"] = record["parts"][0]["started"], record["parts"][-1]["ended"]
    record["final_losses"] = record["parts"][-1]["final"]
    return write(record, os.path.join(out, RECORD))


def write(record: dict, path: str) -> str:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)
    return path


def load(path: str) -> dict:
    if not os.path.isfile(path):
        raise MissingPath(f"audit record {path!r} does not exist")
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidValue(f"audit record {path!r} cannot be read as JSON ({err})") from None
    if not isinstance(record, dict) or record.get("kind") != KIND:
        raise InvalidValue(f"audit record {path!r} is not a {KIND} (no 'kind': {KIND!r})")
    return record


def add_evaluation(path: str, checkpoints: dict, report: dict, settings: dict) -> None:
    """eval --audit: the evaluated checkpoints (with their hashes), the settings and the metrics."""
    record = load(path)
    record["evaluations"].append({"time": now(), "command": sys.argv, "settings": settings,
                                  "models": {name: _checkpoint(p) for name, p in checkpoints.items()},
                                  "report": report})
    write(record, path)


def verify(path: str) -> tuple[list[str], int]:
    """(one line per mismatch, the number of hashes checked): every hash in the record recomputed."""
    record = load(path)
    problems, checked = [], 0

    def check_file(what: str, entry: dict) -> None:
        nonlocal checked
        checked += 1
        try:
            now_hash = sha256_file(entry["path"])
        except OSError as err:
            problems.append(f"{what} {entry['path']}: cannot be read ({err.strerror or err})")
            return
        if now_hash != entry["sha256"]:
            recorded = f"{entry['sha256'][:12]}..." if entry["sha256"] else "none: unreadable when recorded"
            problems.append(f"{what} {entry['path']}: changed (recorded sha256 {recorded}, now {now_hash[:12]}...)")

    try:
        check_file("original checkpoint", record["original"])
        if "unlearned" in record:
            check_file("unlearned checkpoint", record["unlearned"])
        else:
            problems.append("the run never finished: the record holds no unlearned checkpoint")
        if "digits_csv" in record["data"]:
            check_file("embedded digits", record["data"]["digits_csv"])
        for name in ("forget", "retain"):
            entry = record[name]
            checked += 1
            if list_digest(entry["samples"]) != entry["digest"]:
                problems.append(f"{name} set list: edited (its digest does not match the list)")
            for sample in entry["samples"]:
                if isinstance(sample, dict):
                    check_file(f"{name} file", sample)
        for i, evaluation in enumerate(record["evaluations"]):
            for name, entry in evaluation["models"].items():
                check_file(f"evaluation {i + 1}'s model {name}", entry)
    except (KeyError, TypeError) as err:
        raise InvalidValue(f"audit record {path!r} lacks an entry the record format has: {err}") from None
    return problems, checked
