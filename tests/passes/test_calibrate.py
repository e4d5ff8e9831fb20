import pytest
import torch

from sparsefx.errors import CalibrationError
from sparsefx.ir import annotated_linears
from sparsefx.passes.base import PassContext
from sparsefx.passes.calibrate import STATS, ActStats, CalibratePass, collect_statistics, insert_observers


def _hook_reference(model, batches):
    """Per-module input statistics gathered with forward hooks on the eager model (the reference)."""
    acc = {}

    def hook(name):
        def fn(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            s = acc.setdefault(name, [0, 0.0, 0.0])
            s[0] += x.shape[0]
            s[1] = s[1] + x.pow(2).sum(0)
            s[2] = torch.maximum(torch.as_tensor(s[2], dtype=torch.float64), x.abs().amax(0))
        return fn

    hs = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for b in batches:
            model(b[None])
    for h in hs:
        h.remove()
    return acc


def test_statistics_match_hooks_and_observers_are_removed(annotated_llama):
    model, gm = annotated_llama
    batches = torch.randint(0, 256, (5, 17))  # odd count and length; batch_size 2 leaves a partial batch
    before = [n.name for n in gm.graph.nodes]
    result = CalibratePass().run(gm, PassContext(calibration=batches, batch_size=2, progress=False))
    assert [n.name for n in gm.graph.nodes] == before
    assert not any(n.op == "call_module" and "observer" in str(n.target) for n in gm.graph.nodes)
    assert result.report.details["tokens"] == 5 * 17
    ref = _hook_reference(model, batches)
    for node, info in annotated_linears(gm):
        s: ActStats = node.meta[STATS]
        n, sq, amax = ref[info.module]
        assert s.n_tokens == n
        torch.testing.assert_close(s.sq_sum, sq, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.abs_max.double(), amax, rtol=1e-5, atol=1e-6)
        assert s.hist.sum() == n * info.in_features
    # q/k/v share one statistics object
    layer0 = {i.role: n.meta[STATS] for n, i in annotated_linears(gm) if i.layer == 0}
    assert layer0["q"] is layer0["k"] is layer0["v"]


def test_histogram_quantiles_are_close():
    x = torch.randn(4096, 8) * 3
    from sparsefx.passes.calibrate import Observer

    obs = Observer(8)
    obs(x)
    stats = obs.stats()
    for q in (0.1, 0.5, 0.9):
        exact = x.abs().flatten().quantile(q).item()
        assert abs(stats.quantile(q) - exact) / exact < 0.03


def test_nan_statistics_are_refused(annotated_llama):
    model, gm = annotated_llama
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    inserted = insert_observers(gm)
    with torch.no_grad():
        gm(torch.randint(0, 256, (1, 8)))
    with pytest.raises(CalibrationError, match="non-finite.*down_proj"):
        collect_statistics(gm, inserted)


def test_missing_or_malformed_calibration_data(annotated_llama):
    _, gm = annotated_llama
    with pytest.raises(CalibrationError, match="needs calibration data"):
        CalibratePass().run(gm, PassContext(calibration=None))
    with pytest.raises(CalibrationError, match="token ids"):
        CalibratePass().run(gm, PassContext(calibration=torch.randn(2, 8), progress=False))
    # the failed run left no observer behind
    assert not any(n.op == "call_module" and "observer" in str(n.target) for n in gm.graph.nodes)
