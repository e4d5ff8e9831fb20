"""The C++ decode runtime against the HF model it was made from: logits, KV cache across calls, greedy tokens,
perplexity, int8 activations against the prepared HF decode path, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch

from sparsefx.codegen.cpu import prepare_cpu_decode
from sparsefx.models import load_model, tiny_model
from sparsefx.passes.config import Recipe
from sparsefx.pipeline import compress
from sparsefx.runtime import DecodeRuntime, RuntimeUnsupported

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def quantized(arch: str, bits: int | None, symmetric: bool = False, head8: bool = False, seed: int = 0):
    model = tiny_model(arch, seed=seed)
    passes = []
    if bits is not None:
        passes.append({"method": "rtn", "bits": bits, "group_size": 32, "symmetric": symmetric})
    if head8:
        passes.append({"method": "rtn", "bits": 8, "group_size": 32, "symmetric": True, "roles": ["lm_head"]})
    if passes:
        compress(model, Recipe.from_dict({"passes": passes}), progress=False)
    return model


def split_forward(rt: DecodeRuntime, ids: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    """All logits of ``ids`` fed in pieces ending at ``cuts`` (the cache carries the earlier pieces)."""
    out, start = [], 0
    for end in [*cuts, ids.numel()]:
        out.append(rt.forward(ids[start:end], start, all_logits=True))
        start = end
    return torch.cat(out)


@pytest.mark.parametrize("arch, bits, symmetric, head8", [("llama", None, False, False),
                                                          ("qwen2", None, False, False),
                                                          ("llama", 4, False, True),
                                                          ("qwen2", 3, True, False),
                                                          ("llama", 2, False, False),
                                                          ("qwen2", 8, True, True)])
def test_logits_equal_the_hf_model(arch, bits, symmetric, head8):
    # fp32 activations: the same arithmetic as the HF model up to summation order, over pieces of odd lengths
    torch.manual_seed(bits or 1)
    model = quantized(arch, bits, symmetric, head8)
    ids = torch.randint(0, 256, (23,))
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    rt = DecodeRuntime(model, max_len=40, int8_activations=False)
    got = split_forward(rt, ids, [7, 8, 13])
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert rt.forward_calls == 4
    # the last-token form of the same call
    torch.testing.assert_close(rt.forward(ids[13:], 13)[0], ref[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits, symmetric", [(4, True), (3, False), (8, True)])
def test_int8_activations_equal_the_prepared_hf_decode(bits, symmetric):
    # the runtime's int8 path runs the same row kernels as prepare_cpu_decode(int8_activations=True) token by token
    torch.manual_seed(bits)
    model = quantized("qwen2", bits, symmetric, head8=True, seed=bits)
    ids = torch.randint(0, 256, (1, 11))
    rt = DecodeRuntime(model, max_len=16, int8_activations=True)
    got = torch.cat([rt.forward(ids[0, t:t + 1], t) for t in range(ids.shape[1])])
    with torch.no_grad():
        exact = model(ids).logits[0]
        prepare_cpu_decode(model, int8_activations=True)
        out = model(ids[:, :1], use_cache=True)
        ref = [out.logits[0, -1]]
        for t in range(1, ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            ref.append(out.logits[0, -1])
    ref = torch.stack(ref)
    # equal but where fp32 summation order flips an int8 rounding (then by one step of one input's scale)
    assert (got - ref).abs().max() < 1e-2
    assert (got - ref).abs().median() < 1e-5
    # and the rounding is real: not the fp32 path under another name
    assert (got - exact).abs().mean() > 10 * (got - ref).abs().mean()


def test_generate_equals_hf_greedy():
    model = quantized("llama", 4, head8=True, seed=3)
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    ref = prompt
    with torch.no_grad():       # greedy by definition: the argmax of the full forward, token by token
        for _ in range(16):
            ref = torch.cat([ref, model(ref).logits[:, -1:].argmax(-1)], 1)
    rt = DecodeRuntime(model, max_len=32, int8_activations=False)
    assert rt.generate(prompt[0], 16) == ref[0, 9:].tolist()
    assert rt.forward_calls == 16       # one prefill call, then one per new token
    assert rt.decode_tok_s(prompt[0], 4) > 0


def test_perplexity_equals_the_hf_model():
    model = quantized("qwen2", 4, seed=5)
    windows = torch.randint(0, 256, (3, 21), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logp = torch.log_softmax(model(windows).logits[:, :-1].double(), -1)
    ref = math.exp(-float(logp.gather(2, windows[:, 1:, None]).mean()))
    rt = DecodeRuntime(model, max_len=32, int8_activations=False)
    assert rt.perplexity(windows, chunk=5) == pytest.approx(ref, rel=1e-5)
    assert rt.perplexity(windows, chunk=8) == pytest.approx(ref, rel=1e-5)


def test_refusals_name_the_problem():
    routed = tiny_model("llama")
    compress(routed, Recipe.from_dict({"calibration": {"samples": 2, "seqlen": 16},
                                       "passes": [{"method": "daws", "sparsity": 0.5}]}),
             calibration=torch.randint(0, 256, (2, 16)), progress=False)
    with pytest.raises(RuntimeUnsupported, match=r"model\.layers\.0\..*tiered_linear|model\.layers\.0\.\w+\.\w+ is a"):
        DecodeRuntime(routed)
    with pytest.raises(RuntimeUnsupported, match="gemma3_text"):
        DecodeRuntime(tiny_model("gemma3"))
    rt = DecodeRuntime(tiny_model("llama"), max_len=8, int8_activations=False)
    with pytest.raises(RuntimeError, match="max_len 8"):
        rt.forward(torch.arange(6), 4)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        rt.forward([300], 0)
    with pytest.raises(ValueError, match="exceed max_len"):
        rt.generate([1, 2, 3], 8)


@pytest.mark.real_model
def test_smollm2_runtime_greedy_tokens_equal_hf():
    model, tok = load_model("smollm2")
    compress(model, Recipe.from_dict({"passes": [{"method": "rtn", "bits": 4, "group_size": 32,
                                                  "symmetric": True, "scale": "signed_max"}]}), progress=False)
    ids = tok("The capital of France is a city that", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    rt = DecodeRuntime(model, max_len=128, int8_activations=False)
    assert rt.generate(ids[0], 32) == ref[0, ids.shape[1]:].tolist()
