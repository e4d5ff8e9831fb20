"""Scoring a causal LM on requests the way lm-evaluation-harness's ``HFLM`` does, one forward per shared context.

Tokenisation follows ``HFLM._encode_pair``: trailing spaces of the context move to the continuation, the pair is
encoded whole and the context alone, and the continuation's tokens are the whole encoding past the context's
length; no special tokens are added (``add_bos_token`` off, lm-eval's default for these models). The model sees
``context + continuation[:-1]`` and the continuation's log-likelihood is the sum of its tokens' log-probabilities.

Where every choice shares the context, the context runs once (its KV cache kept) and the choices' continuations
run as one batch on copies of that cache, right-padded: under causal attention no real token sees a pad, so no
mask is needed. This gives the same log-likelihoods as one forward per choice up to float summation order.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..errors import DataError


class Scorer:
    """Log-likelihoods and greedy generations of ``model`` (any HF causal LM, a sparsefx artifact included).

    ``max_length``: the longest input the model is given (contexts are cut from the left, as lm-eval does);
    default the model's ``max_position_embeddings``, at most 2,048.
    """

    def __init__(self, model, tokenizer, max_length: int | None = None, device=None):
        self.model, self.tok = model, tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        cfg = getattr(model, "config", None)
        limit = getattr(cfg, "max_position_embeddings", None) or 2048
        self.max_length = int(max_length or min(limit, 2048))
        if getattr(tokenizer, "encode", None) is None or getattr(tokenizer, "decode", None) is None:
            raise DataError(f"the tokenizer {type(tokenizer).__name__} has no encode/decode; task evaluation needs "
                            "a Hugging Face tokenizer (load the model with sparsefx.load_model or pass its tokenizer)")
        self.forwards = 0          # model calls made (tests read it)
        # transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old name warns); both are allowed
        params = inspect.signature(model.forward).parameters
        self._cache_key = "cache" if "cache" in params else "past_key_values"
        # only the positions that are scored need the LM head (~1/5 of a small model's FLOPs per token)
        self._keep = "logits_to_keep" in params

    # --- tokenisation ----------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's ``_encode_pair``: trailing whitespace of the context belongs to the continuation."""
        n = len(context) - len(context.rstrip())
        if n:
            continuation = context[-n:] + continuation
            context = context[:-n]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        cont = whole[len(ctx):]
        if not cont:
            raise DataError(f"the continuation {continuation!r} encodes to no tokens after the context; the "
                            "tokenizer merges it into the context, so it cannot be scored")
        if not ctx:
            raise DataError("a task context encodes to no tokens; the tokenizer needs a BOS/EOS token to score an "
                            "empty context, and this one has none")
        return ctx, cont

    # --- model calls -----------------------------------------------------------------------------------------

    def _new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def _forward(self, ids: torch.Tensor, cache: DynamicCache | None = None, keep: int = 0) -> torch.Tensor:
        """The logits of the last ``keep`` positions (every position when 0), ``[batch, keep, vocab]``."""
        self.forwards += 1
        kw = {"use_cache": False} if cache is None else {"use_cache": True, self._cache_key: cache}
        if keep and self._keep:
            kw["logits_to_keep"] = keep
        logits = self.model(input_ids=ids.to(self.device), **kw).logits
        return logits[:, -keep:] if keep else logits

    @torch.no_grad()
    def loglikelihoods(self, context: str, continuations: list[str]) -> list[tuple[float, bool]]:
        """``(sum log p(continuation | context), every token greedy)`` per continuation, sharing the context."""
        pairs = [self.encode_pair(context, c) for c in continuations]
        ctx = pairs[0][0]
        conts = [p[1] for p in pairs]
        if any(p[0] != ctx for p in pairs):          # a tokenizer that re-splits the context per choice
            return [self._single(c, k) for c, k in pairs]
        longest = max(len(c) for c in conts)
        if len(ctx) + longest - 1 > self.max_length:     # too long to share: score each, cut from the left
            return [self._single(ctx, k) for k in conts]
        cache = self._new_cache()
        # the context's last position predicts every continuation's first token
        first = F.log_softmax(self._forward(torch.tensor([ctx]), cache, keep=1)[0, -1].float(), dim=-1)
        results = [[float(first[k[0]]), bool(first.argmax() == k[0])] for k in conts]
        rest = [i for i, k in enumerate(conts) if len(k) > 1]
        if rest:
            width = max(len(conts[i]) - 1 for i in rest)
            pad = conts[rest[0]][0]
            ids = torch.tensor([conts[i][:-1] + [pad] * (width - len(conts[i]) + 1) for i in rest])
            cache.batch_repeat_interleave(len(rest))
            logp = F.log_softmax(self._forward(ids, cache).float(), dim=-1)
            for row, i in enumerate(rest):
                target = torch.tensor(conts[i][1:])
                lp = logp[row, :len(target)]
                results[i][0] += float(lp.gather(1, target[:, None]).sum())
                results[i][1] = results[i][1] and bool((lp.argmax(-1) == target).all())
        return [(a, b) for a, b in results]

    def _single(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        ids = (ctx + cont)[-(self.max_length + 1):][:-1]
        logits = self._forward(torch.tensor([ids]), keep=len(cont))[0].float()
        logp = F.log_softmax(logits, dim=-1)
        target = torch.tensor(cont)
        return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())

    @torch.no_grad()
    def partial(self, contexts: list[str], continuation: str) -> list[tuple[float, bool]]:
        """Log-likelihood of one continuation after each of several contexts (WinoGrande): one batch."""
        pairs = [self.encode_pair(c, continuation) for c in contexts]
        seqs = [(c + k)[-(self.max_length + 1):][:-1] for c, k in pairs]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [s[-1]] * (width - len(s)) for s in seqs])
        start = min(len(s) - len(k) for s, (_, k) in zip(seqs, pairs))     # the first scored position of any row
        logp = F.log_softmax(self._forward(ids, keep=width - start).float(), dim=-1)
        out = []
        for row, (s, (_, k)) in enumerate(zip(seqs, pairs)):
            lp = logp[row, len(s) - len(k) - start:len(s) - start]
            target = torch.tensor(k)
            out.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
        return out

    @torch.no_grad()
    def generate(self, context: str, until: tuple[str, ...], max_new_tokens: int = 32) -> str:
        """Greedy continuation of ``context`` until a stop string appears (or ``max_new_tokens``), decoded."""
        ids = self.encode(context)[-(self.max_length - max_new_tokens):]
        cache = self._new_cache()
        logits = self._forward(torch.tensor([ids]), cache, keep=1)
        eos = self.tok.eos_token_id
        new: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            if nxt == eos:
                break
            new.append(nxt)
            text = self.tok.decode(new, skip_special_tokens=True)
            if any(s in text for s in until):
                break
            logits = self._forward(torch.tensor([[nxt]]), cache, keep=1)
        return self.tok.decode(new, skip_special_tokens=True)
