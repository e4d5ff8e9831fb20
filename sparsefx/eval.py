"""Evaluation: perplexity under the protocol, decode tokens/s, parameter and non-zero counts."""

from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .codegen.cpu import prepare_cpu_decode
from .data import PROTOCOL, Protocol, eval_windows

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    ppl: float
    nll_sum: float
    tokens: int
    params_total: int
    params_nonzero: int
    linear_params: int          # weights of linears inside decoder layers (what the passes compress)
    linear_nonzero: int
    decode_tok_s: float | None = None
    eval_seconds: float = 0.0

    @property
    def linear_sparsity(self) -> float:
        return 1.0 - self.linear_nonzero / self.linear_params if self.linear_params else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "linear_sparsity": self.linear_sparsity}


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor, progress: bool = True,
               decode: bool = False) -> tuple[float, float, int]:
    """``(ppl, nll_sum, n_predicted)`` of ``model`` over token ``windows: [W, L]``, each window on its own.

    Every window predicts its tokens 1..L-1 from the tokens before them (no context across windows). By default a
    window is one forward (prefill). With ``decode``, it is fed one token at a time through the KV cache, as
    ``generate()`` runs a model: batch-1 calls reach the decode kernels (CPU, once the model is prepared by
    ``codegen.cpu.prepare_cpu_decode``), so their numerics are what is scored. Same predictions, L forwards per
    window.

    Example:
        >>> ppl, _, _ = perplexity(model, eval_windows(tok))  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    nll, n = 0.0, 0
    for w in tqdm(windows, desc="perplexity" + (" (token by token)" if decode else ""), unit="window",
                  disable=not progress):
        ids = w[None].to(device)                                   # [1, L]
        logits = _logits_token_by_token(model, ids) if decode else model(input_ids=ids, use_cache=False).logits
        loss = nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
        nll += loss.item()
        n += ids.shape[1] - 1
    return math.exp(nll / n), nll, n


def _logits_token_by_token(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``[1, L, V]`` logits of ``ids: [1, L]``, one forward per token with the HF KV cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    # transformers renamed ``past_key_values`` to ``cache`` (5.2x; the old name warns); the project allows both
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    steps = []
    for t in range(ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{key: cache})
        cache = out[key]
        steps.append(out.logits[:, -1:].float())
    return torch.cat(steps, dim=1)


@torch.inference_mode()
def decode_tokens_per_s(model: nn.Module, prompt_len: int = 32, new_tokens: int = 64, repeats: int = 2) -> float:
    """Greedy batch-1 decode speed of ``generate()`` with the KV cache, best of ``repeats`` after a warm-up."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    prompt = torch.randint(0, min(vocab, 1000), (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None
                  else model.config.pad_token_id)
    log.info("decode speed: greedy generate(), best of %d runs of %d new tokens after a warm-up", repeats, new_tokens)
    model.generate(prompt, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.generate(prompt, **kwargs)
        dt = time.perf_counter() - t0
        best = max(best, (out.shape[1] - prompt_len) / dt)
    return best


def count_params(model: nn.Module) -> dict[str, int]:
    """Total and non-zero parameters, and the same for decoder-layer linear weights (compressed linears count
    the weights they stand for: a quantized or low-rank linear as dense, a packed N:M or banded one by its non-zero
    values; in the totals too, though they store buffers rather than parameters).

    Example:
        >>> count_params(tiny_model())["linear_params"]  # doctest: +SKIP
    """
    total = nonzero = lin = lin_nz = 0
    counted = set()                   # the layer linears' weights, counted below, not again among the parameters
    layers = getattr(getattr(model, "model", model), "layers", None)
    for mod in (layers.modules() if layers is not None else ()):
        kind = getattr(mod, "kind", None)
        weight = getattr(mod, "weight", None)
        if isinstance(mod, nn.Linear) or (kind and isinstance(weight, torch.Tensor) and weight.dim() == 2):
            counted.add(id(weight))
            lin += weight.numel()                   # dense or activation-sparse linears keep their weight
            lin_nz += int(torch.count_nonzero(weight))
        elif kind in ("quant_linear", "lowrank_quant_linear", "nm_linear", "banded_linear"):
            n_w = mod.in_features * mod.out_features   # stored packed: count the weights they stand for
            lin += n_w
            packed = {"nm_linear": "nm_values", "banded_linear": "weight_banded"}.get(kind)
            lin_nz += int(torch.count_nonzero(getattr(mod, packed))) if packed else n_w
    # compressed linears hold buffers, not parameters: the total counts the weights they stand for, as above
    for p in model.parameters():  # shared (tied) tensors are counted once
        if id(p) not in counted:
            total += p.numel()
            nonzero += int(torch.count_nonzero(p))
    return {"params_total": total + lin, "params_nonzero": nonzero + lin_nz, "linear_params": lin,
            "linear_nonzero": lin_nz}


def stored_bits_per_weight(model: nn.Module) -> float:
    """Bits the decoder layers' linears store per weight they stand for: a compressed linear's artifact tensors
    (packed codes with their scales and zeros, low-rank factors, N:M values and indices, ...), a plain linear its
    weight at its dtype (32 for an fp32 model, 16 for bf16).

    Example:
        >>> stored_bits_per_weight(load("smollm2-rtn-w4-g32"))  # doctest: +SKIP
        4.5
    """
    stored = weights = 0
    layers = getattr(getattr(model, "model", model), "layers", None)
    for mod in (layers.modules() if layers is not None else ()):
        if getattr(mod, "kind", None) and hasattr(mod, "export_state") and hasattr(mod, "in_features"):
            stored += sum(t.numel() * t.element_size() for t in mod.export_state()[1].values() if t is not None)
            weights += mod.in_features * mod.out_features
        elif isinstance(mod, nn.Linear):
            stored += mod.weight.numel() * mod.weight.element_size()
            weights += mod.weight.numel()
    return stored * 8 / weights if weights else 0.0


def evaluate(model: nn.Module, tokenizer, protocol: Protocol = PROTOCOL, speed: bool = True,
             progress: bool = True, windows: torch.Tensor | None = None, prepare_decode: bool = True,
             decode_path: bool = False, int8_activations: bool = False) -> EvalResult:
    """Perplexity under ``protocol`` plus counts and (optionally) decode speed.

    With ``decode_path``, the perplexity is scored token by token through the KV cache (``perplexity(...,
    decode=True)``), a CPU model prepared for the decode kernels first (unless ``prepare_decode`` is False): the
    numerics of generation rather than of prefill.

    With ``speed`` and ``prepare_decode``, a model on CPU is prepared for the CPU decode kernels
    (``codegen.cpu.prepare_cpu_decode``: weights re-stored in place, outputs equal up to fp32 summation order) after
    the perplexity and before the timing, so the speed is what the kernels give. Pass ``prepare_decode=False`` for a
    compiled model (prepare it before ``torch.compile``: the ``sparsefx`` backend lowers to the kernels, whose fast
    one-token paths read the prepared layout, but re-stores no weights) or to time the model as it is.
    ``int8_activations`` is passed to that preparation (quantized linears decode with x rounded to int8); only a
    ``decode_path`` perplexity sees it.

    Example:
        >>> evaluate(model, tok).ppl  # doctest: +SKIP
        19.74
    """
    t0 = time.perf_counter()
    windows = eval_windows(tokenizer, protocol) if windows is None else windows
    on_cpu = next(model.parameters()).device.type == "cpu"
    if decode_path and prepare_decode and on_cpu:
        _prepare(model, int8_activations)
    # one line per stage: without a terminal there are no bars, and a compiled model's first window compiles
    log.info("perplexity: %d windows of %d tokens%s", windows.shape[0], windows.shape[1],
             ", token by token through the KV cache" if decode_path else "")
    ppl, nll, n = perplexity(model, windows, progress, decode=decode_path)
    tok_s = None
    if speed:
        if prepare_decode and on_cpu:
            _prepare(model, int8_activations)
        tok_s = decode_tokens_per_s(model)
    return EvalResult(ppl=ppl, nll_sum=nll, tokens=n, decode_tok_s=tok_s, eval_seconds=time.perf_counter() - t0,
                      **count_params(model))


def _prepare(model: nn.Module, int8_activations: bool = False) -> None:
    prepare_cpu_decode(model, int8_activations=int8_activations)
