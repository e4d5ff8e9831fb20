import pytest
import torch

from sparsefx.errors import UnsupportedModelError
from sparsefx.ir import annotate, capture, param_name
from sparsefx.models import tiny_model


def test_capture_matches_eager_for_dynamic_shapes(arch):
    model = tiny_model(arch)
    gm = capture(model)
    for shape in [(1, 2), (3, 13), (2, 40)]:  # batch 1, odd lengths, longer than the capture example
        ids = torch.randint(0, 256, shape)
        with torch.no_grad():
            torch.testing.assert_close(gm(ids), model(ids).logits, rtol=0, atol=1e-5)


def test_parameters_are_shared_with_the_hf_model(llama):
    gm = capture(llama)
    weights = [n for n in gm.graph.nodes if n.op == "get_attr" and param_name(gm, n).endswith("q_proj.weight")]
    assert weights
    name = param_name(gm, weights[0])
    assert gm.get_parameter("hf." + name) is llama.get_parameter(name)


def test_non_hf_module_is_refused():
    with pytest.raises(UnsupportedModelError, match="not a Hugging Face causal LM"):
        capture(torch.nn.Linear(4, 4))


def test_conv1d_model_error_names_op_and_node():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64)).eval()
    gm = capture(model)
    with pytest.raises(UnsupportedModelError, match=r"unsupported op aten\.\w+\.default at node '\w+'.*c_attn"):
        annotate(gm)
