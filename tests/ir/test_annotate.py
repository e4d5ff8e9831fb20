import pytest

from sparsefx.ir import LAYERS, annotate, annotated_linears, capture
from sparsefx.models import tiny_model

# Test-only oracle: the HF module names of these architectures. annotate() never reads names for roles.
_BY_NAME = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
            "down_proj": "down", "lm_head": "lm_head"}


def _expected(param: str) -> str:
    return _BY_NAME[param.rsplit(".", 2)[-2]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_roles_layers_and_geometry(arch, attn):
    model = tiny_model(arch)
    model.config._attn_implementation = attn
    gm = capture(model)
    layers = annotate(gm)
    found = annotated_linears(gm)
    assert len(found) == 7 * model.config.num_hidden_layers + 1
    for _, info in found:
        assert info.role == _expected(info.param), info
        if info.role != "lm_head":
            assert info.layer == int(info.param.split(".")[2])
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        li = gm.meta[LAYERS][i]
        assert (li.num_heads, li.num_kv_heads, li.head_dim) == (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                                head_dim)
        assert sorted(li.linears) == sorted(["q", "k", "v", "o", "gate", "up", "down"])
    assert set(layers) == set(range(cfg.num_hidden_layers))


def test_shared_inputs_are_recorded(annotated_llama):
    _, gm = annotated_llama
    by_role = {}
    for _, info in annotated_linears(gm):
        if info.layer == 0:
            by_role[info.role] = info.input_node
    assert by_role["q"] == by_role["k"] == by_role["v"]
    assert by_role["gate"] == by_role["up"]
    assert len({by_role["q"], by_role["o"], by_role["gate"], by_role["down"]}) == 4
