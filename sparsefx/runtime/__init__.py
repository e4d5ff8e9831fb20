"""The CPU decode runtime: a whole decoder forward in one C++ call (``decode.cpp``), for serving a compressed
llama-family model on CPU without Python or HF module overhead between ops.

HF ``generate()`` over our compressed modules spends about 40 % of a SmolLM2 token outside the kernels (per-module
Python, the op dispatcher, KV-cache concatenation, small norm and RoPE ops), which no kernel speed-up removes.
``DecodeRuntime`` takes the model's weights once — quantized linears (RTN, GPTQ: ``quant_linear``) as their packed
codes, plain linears as fp32 — and runs embedding -> blocks -> head for M new tokens per call against a KV cache
it allocates up front (``max_len`` positions). q/k/v and gate/up read their shared input in one parallel region
each; with ``int8_activations`` (the default) the input of every quantized linear is rounded to int8 per 32 channels
as llama.cpp's Q8_0 activations are, and codes multiply as bytes.

    rt = DecodeRuntime(load("smollm2-gptq-w4-g32-sym-head8"))
    rt.generate([1, 2, 3], max_new_tokens=32)      # greedy token ids
    rt.perplexity(windows)                         # our protocol's scoring, through the runtime

Supported: llama, mistral and qwen2 configs (RMSNorm, SiLU MLP, rotate-half RoPE as the model's own rotary module
computes it, grouped-query attention, biases where the checkpoint has them), linears dense or ``quant_linear``.
Anything else (activation routing, DAM's low-rank correction, N:M packing, structured models, Gemma) is refused by
name: serve those through ``sparsefx.load`` + ``generate()``.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..ops.build import cpu_supports_kernels, load_extension
from ..sequential.blocks import text_config

SOURCE = Path(__file__).with_name("decode.cpp")
ARCHS = ("llama", "mistral", "qwen2")
ROLES = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
         ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


class RuntimeUnsupported(UnsupportedModelError):
    """The model has something the decode runtime does not run (the message names it)."""


@functools.cache
def extension():
    """Build (once per environment) and load ``decode.cpp``; registers ``torch.classes.sparsefx_cpu.DecodeRuntime``."""
    if not cpu_supports_kernels():
        raise RuntimeUnsupported("the decode runtime needs a CPU with AVX2, FMA and F16C; this one lacks them "
                                 "(use sparsefx.load + generate() instead)")
    return load_extension("runtime", SOURCE, "the C++ decode runtime")


def _refuse(what: str) -> RuntimeUnsupported:
    return RuntimeUnsupported(f"{what}; the decode runtime runs llama/mistral/qwen2 models whose linears are dense or "
                              "quant_linear (rtn, gptq): serve this one with sparsefx.load + generate()")


def _linear(rt, slot: int, name: str, module: nn.Module) -> None:
    bias = getattr(module, "bias", None)
    bias = torch.empty(0) if bias is None else bias.detach().float().contiguous()
    kind = getattr(module, "kind", None)
    if kind == "quant_linear":
        z = module.qweight_zeros
        rt.set_quant(slot, module.qweight_packed.contiguous(), module.qweight_scales.contiguous(),
                     torch.empty(0, dtype=torch.uint8) if z is None else z.contiguous(), bias,
                     module.spec.bits, module.spec.group_size)
    elif isinstance(module, nn.Linear) and kind is None:
        rt.set_dense(slot, module.weight.detach().float().contiguous(), bias)
    else:
        raise _refuse(f"{name} is a {kind or type(module).__name__}")


class DecodeRuntime:
    """A model's weights handed to the C++ runtime once, with a KV cache of ``max_len`` positions."""

    def __init__(self, model: nn.Module, max_len: int = 2048, int8_activations: bool = True):
        text = text_config(model)
        if text.model_type not in ARCHS:
            raise _refuse(f"architecture {text.model_type!r} is not supported")
        if getattr(text, "hidden_act", "silu") != "silu":
            raise _refuse(f"hidden_act {text.hidden_act!r} (only silu)")
        window = getattr(text, "sliding_window", None)
        if window and max_len > window and getattr(text, "use_sliding_window", True):
            raise _refuse(f"sliding-window attention ({window} positions) with max_len {max_len}: make the runtime "
                          f"with max_len <= {window}")
        if (Path(getattr(model, "name_or_path", "") or ".") / "structure.json").is_file():
            raise _refuse("a structurally pruned model (layers of different shapes)")
        inner = model.model
        layers = inner.layers
        n_heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // n_heads
        n_kv = getattr(text, "num_key_value_heads", None) or n_heads
        self.model, self.max_len, self.int8_activations = model, max_len, int8_activations
        self.vocab = text.vocab_size
        with torch.no_grad():
            pos = torch.arange(max_len)[None]
            probe = torch.zeros(1, 1, text.hidden_size)
            cos, sin = inner.rotary_emb(probe, pos)
            embed = inner.embed_tokens.weight.detach().float().contiguous()
            ints = [len(layers), text.hidden_size, n_heads, n_kv, head_dim, text.intermediate_size, text.vocab_size,
                    max_len, int(int8_activations)]
            extension()
            rt = torch.classes.sparsefx_cpu.DecodeRuntime(ints, float(text.rms_norm_eps), embed,
                                                          inner.norm.weight.detach().float().contiguous(),
                                                          cos[0].float().contiguous(), sin[0].float().contiguous())
            for i, layer in enumerate(layers):
                if layer.self_attn.q_proj.out_features != n_heads * head_dim:
                    raise _refuse(f"model.layers.{i} has {layer.self_attn.q_proj.out_features} query rows, not "
                                  f"{n_heads} heads x {head_dim}")
                rt.set_norms(i, layer.input_layernorm.weight.detach().float().contiguous(),
                             layer.post_attention_layernorm.weight.detach().float().contiguous())
                for r, (part, proj) in enumerate(ROLES):
                    _linear(rt, 7 * i + r, f"model.layers.{i}.{part}.{proj}", getattr(getattr(layer, part), proj))
            head = model.get_output_embeddings()
            if getattr(head, "kind", None) is None and getattr(head, "weight", None) is inner.embed_tokens.weight:
                rt.set_dense(7 * len(layers), embed, torch.empty(0))   # tied: the fp32 embedding copy, not a second
            else:
                _linear(rt, 7 * len(layers), "lm_head", head)
        self.rt = rt

    @property
    def forward_calls(self) -> int:
        """How many times the C++ forward ran (tests count it: the runtime, not a fallback, made the tokens)."""
        return self.rt.forward_calls()

    def forward(self, tokens, pos: int, all_logits: bool = False) -> torch.Tensor:
        """Logits ``[1, vocab]`` of the last of ``tokens`` (``[len, vocab]`` with ``all_logits``), which take
        positions ``pos, pos + 1, ...`` of the cache (earlier positions must hold this sequence's keys already)."""
        ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        return self.rt.forward(ids, int(pos), bool(all_logits))

    def generate(self, prompt, max_new_tokens: int) -> list[int]:
        """Greedy token ids after ``prompt`` (a list or 1-D tensor of ids)."""
        ids = torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
        if ids.numel() + max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({ids.numel()}) + max_new_tokens ({max_new_tokens}) exceed max_len "
                             f"{self.max_len}")
        nxt = int(self.forward(ids, 0).argmax())
        out = [nxt]
        for step in range(max_new_tokens - 1):
            nxt = int(self.forward([nxt], ids.numel() + step).argmax())
            out.append(nxt)
        return out

    def decode_tok_s(self, prompt, new_tokens: int) -> float:
        """Tokens per second of ``new_tokens`` greedy steps after the prefilled ``prompt`` (prefill not timed)."""
        ids = torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
        nxt = int(self.forward(ids, 0).argmax())
        t0 = time.perf_counter()
        for step in range(new_tokens):
            nxt = int(self.forward([nxt], ids.numel() + step).argmax())
        return new_tokens / (time.perf_counter() - t0)

    def perplexity(self, windows: torch.Tensor, chunk: int = 8, progress: bool = False) -> float:
        """exp(mean NLL) over ``windows: [n, T]``, each window from a fresh context, fed ``chunk`` tokens per call
        (the decode kernels take a few rows at a time; the numbers do not depend on ``chunk``)."""
        from tqdm.auto import tqdm

        nll, count = 0.0, 0
        for row in tqdm(windows, desc="perplexity (runtime)", unit="window", disable=not progress):
            if row.numel() > self.max_len:
                raise ValueError(f"a window of {row.numel()} tokens exceeds max_len {self.max_len}")
            logits = torch.cat([self.forward(row[s:s + chunk], s, all_logits=True)
                                for s in range(0, row.numel(), chunk)])
            logp = torch.log_softmax(logits[:-1].double(), -1)
            nll -= float(logp.gather(1, row[1:, None]).sum())
            count += row.numel() - 1
        return math.exp(nll / count)


__all__ = ["DecodeRuntime", "RuntimeUnsupported", "extension"]
