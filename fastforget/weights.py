"""Reading and writing weight files safely: every checkpoint and model file goes through here.

torch.load(weights_only=True) unpickles tensors, dicts, lists and numbers only; a file that
carries pickled code (a global to call: os.system, a model class) is refused before anything
runs. torch's zip reader does not check its CRCs, so a flipped byte inside a tensor would load
silently: fastforget's own files carry a SHA-256 of their whole content ("integrity"), written
by with_digest and checked on every load. The errors say which case it is, for which file.
"""
from __future__ import annotations

import hashlib
import os
import pickle

import torch

from .errors import InvalidValue, MissingPath

DIGEST_KEY = "integrity"


def digest(obj) -> str:
    """SHA-256 of a nested structure of dicts, lists, tensors and plain values, in a fixed order."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, dict):
            h.update(b"{")
            for key in sorted(x, key=repr):
                h.update(repr(key).encode() + b":")
                feed(x[key])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for item in x:
                feed(item)
            h.update(b"]")
        elif isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(x).encode())
    feed(obj)
    return h.hexdigest()


def with_digest(state: dict) -> dict:
    """state plus its digest, as save_atomic writes it."""
    return {**state, DIGEST_KEY: digest({k: v for k, v in state.items() if k != DIGEST_KEY})}


def load_weights(path: str, what: str = "weights file") -> object:
    """torch.load(path, map_location="cpu", weights_only=True) with errors that name the file:
    FileNotFoundError when it is missing; ValueError when it carries pickled code (refused), is
    truncated or corrupted, or its content no longer matches the digest written with it."""
    if not os.path.isfile(path):
        raise MissingPath(f"{what} {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err):  # not a refused global: the bytes are not a pickle at all
            raise InvalidValue(f"{what} {path} cannot be read (truncated or corrupted): "
                             f"{_reason(err)}") from err
        raise InvalidValue(
            f"{what} {path} was refused: it carries pickled objects other than tensors and plain containers "
            f"(code would run on loading, so fastforget never loads such files). If you trust its source, "
            f"re-save just its tensors (torch.save(obj['model'] ...)). Detail: {_reason(err)}") from err
    except Exception as err:  # zip/pickle damage surfaces as RuntimeError, EOFError, ...
        raise InvalidValue(f"{what} {path} cannot be read (truncated or corrupted): {err}") from err
    if isinstance(obj, dict) and DIGEST_KEY in obj:
        body = {k: v for k, v in obj.items() if k != DIGEST_KEY}
        if digest(body) != obj[DIGEST_KEY]:
            raise InvalidValue(f"{what} {path} is corrupted: its content does not match the SHA-256 written with it")
        return body
    return obj


def _reason(err: Exception) -> str:
    """The line of torch's weights_only message that says what was found (its first lines are advice)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    found = [line for line in lines if "GLOBAL" in line or "Unsupported" in line or "error" in line.lower()]
    return (found or lines or [type(err).__name__])[-1]
