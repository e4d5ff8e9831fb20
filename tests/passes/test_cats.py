import pytest
import torch

from sparsefx.errors import RecipeError
from sparsefx.models import tiny_model
from sparsefx.passes.cats import CATS
from sparsefx.passes.config import Recipe, config_from_dict
from sparsefx.pipeline import compress

threshold = torch.ops.sparsefx.threshold


@pytest.mark.parametrize("shape", [(1,), (3, 13, 31), (2, 1, 97)])
def test_threshold_op(shape):
    x = torch.randn(shape)
    for t in (0.0, 0.4, 2.0):
        ref = x * (x.abs() >= t)
        assert torch.equal(threshold(x, t), ref)
    torch.library.opcheck(threshold, (x, 0.5))


def test_invalid_values():
    with pytest.raises(RecipeError, match=r"cats\.sparsity"):
        config_from_dict({"method": "cats", "sparsity": 1.2})


def test_pass_thresholds_each_mlp_activation(arch, tokens):
    model = tiny_model(arch)
    calib = torch.randint(0, 256, (8, 32))
    result = compress(model, Recipe.from_yaml("passes: [{method: cats, sparsity: 0.5}]"), calibration=calib,
                      progress=False)
    report = result.reports[-1]
    n_layers = model.config.num_hidden_layers
    assert report.matches == n_layers
    # Only up and down rows/columns are skipped: 2/3 of the MLP's MACs at most.
    layer = model.model.layers[0]
    macs = {n: m.weight.numel() for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = 0.5 * (macs["mlp.up_proj"] + macs["mlp.down_proj"]) / sum(macs.values())
    assert report.details["effective_sparsity"] == pytest.approx(expected, rel=0.1)
    # The HF activation module is replaced; on the calibration tokens it zeroes about half of its outputs.
    act = model.model.layers[0].mlp.act_fn
    assert type(act).__name__ == "ThresholdedAct"
    seen = []
    h = act.register_forward_hook(lambda m, a, out: seen.append((out == 0).float().mean().item()))
    with torch.no_grad():
        model(calib)
        torch.testing.assert_close(result.graph_module(tokens), model(tokens).logits, rtol=0, atol=0)
    h.remove()
    assert seen[0] == pytest.approx(0.5, abs=0.05)
    thr_nodes = [n for n in result.graph_module.graph.nodes if CATS in n.meta]
    assert len(thr_nodes) == n_layers
    out = model.generate(tokens[:1, :5], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)
