"""The dependency graph's groups are checked functionally: removing a unit physically must equal zeroing it."""

import pytest
import torch

from sparsefx.ir import annotate, build_dependency_graph, capture, coupled_groups
from sparsefx.models import tiny_model


def _groups(model):
    gm = capture(model)
    annotate(gm)
    return gm, coupled_groups(gm)


def _remove_unit(model, group, unit):
    """Physically slice unit ``unit`` out of every member axis of ``group``."""
    for (param, axis), sl in group.unit_slices(unit).items():
        w = model.get_parameter(param)
        keep = torch.ones(w.shape[axis], dtype=torch.bool)
        keep[sl] = False
        mod_name, _, attr = param.rpartition(".")
        setattr(model.get_submodule(mod_name), attr, torch.nn.Parameter(w[keep] if axis == 0 else w[:, keep]))


def test_group_geometry(arch):
    model = tiny_model(arch)
    gm, groups = _groups(model)
    cfg = model.config
    assert len(groups) == 2 * cfg.num_hidden_layers
    for g in groups:
        if g.kind == "attention":
            assert g.n_units == cfg.num_key_value_heads
            params = {p.rsplit(".", 2)[-2] for p, _, _ in g.members}
            assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= params
        else:
            assert g.n_units == cfg.intermediate_size
    dep = build_dependency_graph(gm)
    assert dep.has_edge(("model.layers.0.mlp.up_proj.weight", 0), ("model.layers.0.mlp.down_proj.weight", 1))


@torch.no_grad()
@pytest.mark.parametrize("arch_name", ["llama", "qwen2"])
def test_removing_a_kv_group_equals_zeroing_its_output(arch_name):
    # Zeroing o_proj columns of a KV group's query heads removes exactly that group's contribution; physically
    # slicing the group's q/k/v rows (and biases) and o columns must give the same logits. A wrong GQA mapping
    # (query heads paired with the wrong KV head) would not.
    model = tiny_model(arch_name)
    gm, groups = _groups(model)
    group = next(g for g in groups if g.kind == "attention" and g.layer == 0)
    drop = 1
    zeroed = tiny_model(arch_name)
    for (param, axis), sl in group.unit_slices(drop).items():
        if param.endswith("o_proj.weight"):
            zeroed.get_parameter(param)[:, sl] = 0
    _remove_unit(model, group, drop)
    ids = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(model(ids).logits, zeroed(ids).logits, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_removing_an_mlp_channel_equals_zeroing_it(llama):
    gm, groups = _groups(llama)
    group = next(g for g in groups if g.kind == "mlp" and g.layer == 1)
    ref = tiny_model("llama")
    down = "model.layers.1.mlp.down_proj.weight"
    ref.get_parameter(down)[:, 5] = 0
    _remove_unit(llama, group, 5)
    ids = torch.randint(0, 256, (1, 11))
    torch.testing.assert_close(llama(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_unit_slices_bounds(annotated_llama):
    _, gm = annotated_llama
    g = coupled_groups(gm)[0]
    with pytest.raises(IndexError):
        g.unit_slices(g.n_units)
