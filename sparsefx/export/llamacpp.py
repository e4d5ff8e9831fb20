"""A GGUF file run by llama.cpp (``llama-cpp-python``, the optional extra ``sparsefx[llamacpp]``): the engine side of
the round trips and of ``bench/vs_llamacpp.py`` — logits, greedy tokens, perplexity over our protocol's windows and
decode speed, with token ids in and out (no text), so both engines see the same inputs.

``llama-cpp-python`` is built from its sdist (``CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" pip install
llama-cpp-python``; ~25 minutes on 2 cores); without it, ``LlamaCpp`` raises ``ImportError`` naming that command.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

INSTALL = ('CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" pip install "llama-cpp-python>=0.3" '
           "(builds llama.cpp from source, ~25 min on 2 cores; then pip install the wheel it caches)")


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCpp:
    """One GGUF file loaded by llama.cpp. ``threads``: threads for decode and prefill; ``n_ctx``: the longest
    sequence (prompt + generated) a call may use.

    Example:
        >>> m = LlamaCpp("q40.gguf", threads=2)  # doctest: +SKIP
        >>> m.greedy([1, 504, 3458], 8)  # doctest: +SKIP
    """

    def __init__(self, path: str | Path, threads: int = 2, n_ctx: int = 2048, logits_all: bool = True):
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise ImportError(f"llama.cpp is not installed: {INSTALL}") from exc
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such GGUF file; write one with `sparsefx export --format gguf`")
        self.llm = Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=min(n_ctx, 1024), n_ubatch=min(n_ctx, 1024),
                         n_threads=threads, n_threads_batch=threads, logits_all=logits_all, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def logits(self, tokens: list[int]) -> torch.Tensor:
        """``[len(tokens), vocab]`` fp32 logits of one sequence from a fresh context."""
        self.llm.reset()
        self.llm.eval(list(map(int, tokens)))
        return torch.from_numpy(np.array(self.llm.scores[: len(tokens)], dtype=np.float32))

    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        """``steps`` greedy tokens after ``prompt`` (argmax of llama.cpp's logits, the KV cache reused)."""
        self.llm.reset()
        self.llm.eval(list(map(int, prompt)))
        out = []
        for _ in range(steps):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(nxt)
            self.llm.eval([nxt])
        return out

    def perplexity(self, windows: torch.Tensor) -> float:
        """exp(mean NLL) over ``windows: [n, T]`` token ids, each window from a fresh context (our protocol's
        scoring: every position but the first predicted)."""
        nll, count = 0.0, 0
        for row in windows.tolist():
            logp = torch.log_softmax(self.logits(row)[:-1].double(), -1)
            target = torch.tensor(row[1:])
            nll -= float(logp.gather(1, target[:, None]).sum())
            count += len(row) - 1
        return math.exp(nll / count)

    def decode_tok_s(self, prompt: list[int], new_tokens: int) -> float:
        """Tokens per second of ``new_tokens`` greedy steps after a prefilled ``prompt`` (the prefill not timed)."""
        self.llm.reset()
        self.llm.eval(list(map(int, prompt)))
        nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            self.llm.eval([nxt])
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
        return new_tokens / (time.perf_counter() - t0)


__all__ = ["INSTALL", "LlamaCpp", "available"]
