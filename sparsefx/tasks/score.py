"""Scoring a causal LM on requests the way lm-evaluation-harness's ``HFLM`` does, one forward per shared context.

Tokenisation follows ``HFLM._encode_pair``: trailing spaces of the context move to the continuation, the pair is
encoded whole and the context alone, and the continuation's tokens are the whole encoding past the context's
length; no special tokens are added (``add_bos_token`` off, lm-eval's default for these models). The model sees
``context + continuation[:-1]`` and the continuation's log-likelihood is the sum of its tokens' log-probabilities.

Where every choice shares the context, the context runs once (its KV cache kept) and the choices' continuations
run as one batch on copies of that cache, right-padded: under causal attention no real token sees a pad, so no
mask is needed. This gives the same log-likelihoods as one forward per choice up to float summation order.

Several requests run together (``loglikelihood_batch``): their contexts left-padded into one forward, an
attention mask hiding the pads, position ids counting each row's real tokens, and the continuations going on
from each row's own length; ``partial_many`` right-pads whole sequences (no mask needed). A CPU runs a small model's linears several times faster at a few hundred
rows than at the ~30 of one context, so batching is most of the speed of a task run.
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

    def _forward(self, ids: torch.Tensor, cache: DynamicCache | None = None, keep: int = 0,
                 mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The logits of the last ``keep`` positions (every position when 0), ``[batch, keep, vocab]``.
        ``mask``: the 2-D attention mask over cached and new positions (1 = a real token); ``positions``: the
        new tokens' position ids, where rows continue from different lengths."""
        self.forwards += 1
        kw = {"use_cache": False} if cache is None else {"use_cache": True, self._cache_key: cache}
        if keep and self._keep:
            kw["logits_to_keep"] = keep
        if mask is not None:
            kw["attention_mask"] = mask.to(self.device)
        if positions is not None:
            kw["position_ids"] = positions.to(self.device)
        logits = self.model(input_ids=ids.to(self.device), **kw).logits
        return logits[:, -keep:] if keep else logits

    @torch.no_grad()
    def loglikelihoods(self, context: str, continuations: list[str]) -> list[tuple[float, bool]]:
        """``(sum log p(continuation | context), every token greedy)`` per continuation, sharing the context."""
        return self.loglikelihood_batch([(context, continuations)])[0]

    @torch.no_grad()
    def loglikelihood_batch(self, requests: list[tuple[str, list[str]]]) -> list[list[tuple[float, bool]]]:
        """``loglikelihoods`` of several ``(context, continuations)`` requests: the contexts in one forward
        (left-padded, masked), then every continuation longer than one token in one more on the context's cache.
        A request whose context tokenizes differently per choice, or is too long to share, is scored per choice."""
        out: list = [None] * len(requests)
        shared = []                                   # (request index, context ids, continuation ids)
        for i, (context, continuations) in enumerate(requests):
            pairs = [self.encode_pair(context, c) for c in continuations]
            ctx, conts = pairs[0][0], [p[1] for p in pairs]
            if any(p[0] != ctx for p in pairs):      # a tokenizer that re-splits the context per choice
                out[i] = [self._single(c, k) for c, k in pairs]
            elif len(ctx) + max(len(k) for k in conts) - 1 > self.max_length:  # score each, cut from the left
                out[i] = [self._single(ctx, k) for k in conts]
            else:
                shared.append((i, ctx, conts))
        if shared:
            for (i, _, _), res in zip(shared, self._shared_contexts([(c, k) for _, c, k in shared])):
                out[i] = res
        return out

    def _shared_contexts(self, reqs: list[tuple[list[int], list[list[int]]]]) -> list[list[tuple[float, bool]]]:
        # Contexts are left-padded: every row's last token is the batch's last position, and a continuation lies
        # as far from its context in the cache as in the text, which sliding-window attention (Gemma, Mistral)
        # measures in cache positions. Position ids count real tokens only.
        lens = [len(c) for c, _ in reqs]
        width = max(lens)
        padded = len(set(lens)) > 1
        ids = torch.tensor([[c[0]] * (width - len(c)) + c for c, _ in reqs])
        kw = {}
        if padded:
            mask = torch.tensor([[0] * (width - n) + [1] * n for n in lens])
            kw = {"mask": mask, "positions": (mask.cumsum(1) - 1).clamp(min=0)}
        cache = self._new_cache()
        logits = self._forward(ids, cache, keep=1, **kw)
        results = []
        for r, (ctx, conts) in enumerate(reqs):
            # the context's last position predicts every continuation's first token
            first = F.log_softmax(logits[r, -1].float(), dim=-1)
            top = int(first.argmax())
            results.append([[float(first[k[0]]), top == k[0]] for k in conts])
        rest = [(r, j) for r, (_, conts) in enumerate(reqs) for j, k in enumerate(conts) if len(k) > 1]
        if not rest:
            return [[(a, b) for a, b in res] for res in results]
        conts = [reqs[r][1][j] for r, j in rest]
        span = max(len(k) - 1 for k in conts)
        ids = torch.tensor([k[:-1] + [k[0]] * (span - len(k) + 1) for k in conts])
        rows = torch.tensor([r for r, _ in rest])
        if len(reqs) == 1:
            cache.batch_repeat_interleave(len(rest))
        else:
            cache.batch_select_indices(rows)
        if padded:                                    # each row goes on from its own context's length
            kw = {"mask": torch.cat([mask[rows], torch.ones(len(rest), span, dtype=mask.dtype)], dim=1),
                  "positions": torch.tensor(lens)[rows][:, None] + torch.arange(span)[None]}
        logits = self._forward(ids, cache, **kw)
        for row, ((r, j), k) in enumerate(zip(rest, conts)):
            target = torch.tensor(k[1:])
            lp = F.log_softmax(logits[row, :len(target)].float(), dim=-1)      # per row: no batch-sized copy
            results[r][j][0] += float(lp.gather(1, target[:, None]).sum())
            results[r][j][1] = results[r][j][1] and bool((lp.argmax(-1) == target).all())
        return [[(a, b) for a, b in res] for res in results]

    def _single(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        ids = (ctx + cont)[-(self.max_length + 1):][:-1]
        logits = self._forward(torch.tensor([ids]), keep=len(cont))[0].float()
        logp = F.log_softmax(logits, dim=-1)
        target = torch.tensor(cont)
        return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())

    @torch.no_grad()
    def partial(self, contexts: list[str], continuation: str) -> list[tuple[float, bool]]:
        """Log-likelihood of one continuation after each of several contexts (WinoGrande): one batch."""
        return self.partial_many([(c, continuation) for c in contexts])

    @torch.no_grad()
    def partial_many(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """Log-likelihood of each ``(context, continuation)``, every pair a row of one right-padded batch (no
        mask: under causal attention no real token sees a pad); the LM head runs from the first scored position
        of any row on."""
        enc = [self.encode_pair(c, k) for c, k in pairs]
        seqs = [(c + k)[-(self.max_length + 1):][:-1] for c, k in enc]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [s[-1]] * (width - len(s)) for s in seqs])
        start = min(len(s) - len(k) for s, (_, k) in zip(seqs, enc))     # the first scored position of any row
        logits = self._forward(ids, keep=width - start)
        out = []
        for row, (s, (_, k)) in enumerate(zip(seqs, enc)):
            lp = F.log_softmax(logits[row, len(s) - len(k) - start:len(s) - start].float(), dim=-1)
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
