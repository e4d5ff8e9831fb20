"""Walk the op registry: every compressed op has its schema, fake, reference, eager module, argument view and a
kernel per backend (or a stated reason), and every kernel agrees with the reference on fresh random inputs."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import sparsefx
from sparsefx.ops import REGISTRY, ArgsView, spec_for_target
from sparsefx.ops.build import cpu_supports_kernels
from sparsefx.ops.triton_support import available as triton_available

SPECS = sorted(REGISTRY)
OPS_DIR = Path(sparsefx.__file__).parent / "ops"


def _ops_in_namespace() -> set[str]:
    """Every ``sparsefx::*`` op defined by the ops package except the Triton kernels' own ops."""
    found = set()
    for path in OPS_DIR.rglob("op.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "custom_op":
                found.add(node.args[0].value.split("::")[1])
    return found


def test_every_op_of_the_package_is_registered():
    assert _ops_in_namespace() == set(REGISTRY)
    assert len(REGISTRY) == 8


@pytest.mark.parametrize("name", SPECS)
def test_spec_names_a_reference_fake_eager_module_view_and_kernels(name):
    spec = REGISTRY[name]
    assert spec_for_target(spec.op) is spec and (OPS_DIR / spec.family / "op.py").is_file()
    # the argument view's fields are the schema's arguments, in order
    schema = [a.name for a in spec.op._schema.arguments]
    assert issubclass(spec.args, ArgsView) and spec.args.names() == schema
    assert callable(spec.reference) and spec.reference.__module__.endswith(f"ops.{spec.family}.op")
    assert torch._library.simple_registry.singleton.find(f"sparsefx::{name}").fake_impl.kernel is not None
    eager = spec.eager
    assert eager.__module__.endswith(f"ops.{spec.family}.eager")
    for method in ("export_state", "restore", "forward"):
        assert callable(getattr(eager, method))
    assert isinstance(eager.kind, str) and callable(spec.to_eager) and callable(spec.example)
    for backend in ("cpu", "triton"):
        has_kernel = backend in spec.kernels
        reason = spec.no_kernel.get(backend, "")
        assert has_kernel != bool(reason.strip()), f"{name}: a {backend} kernel or a reason, exactly one"
    if "cpu" in spec.kernels:
        assert spec.prepare_cpu is not None and "cpu" in spec.setup
        assert (OPS_DIR / spec.family / "cpu.py").is_file() and list((OPS_DIR / spec.family).glob("*.cpp"))
    if "triton" in spec.kernels:
        assert (OPS_DIR / spec.family / "triton.py").is_file()


@pytest.mark.parametrize("name", SPECS)
def test_argument_view_reads_and_updates_a_node(name):
    spec = REGISTRY[name]
    graph = torch.fx.Graph()
    args = spec.example(torch.Generator().manual_seed(0), 1)
    inputs = [graph.placeholder(f"a{i}") if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
    node = graph.call_function(spec.op, tuple(inputs[:2]), {n: v for n, v in zip(spec.args.names()[2:], inputs[2:])})
    view = spec.args.from_node(node)
    assert view.as_args() == tuple(inputs)
    last = spec.args.names()[-1]
    view.update(node, **{last: "changed"})                          # a keyword argument (threshold: positional)
    assert spec.args.from_node(node).as_args()[-1] == "changed" and view.as_args()[-1] == "changed"
    second = spec.args.names()[1]
    view.update(node, **{second: "new"})                            # a positional argument
    assert node.args[1] == "new" and spec.args.from_node(node).as_args()[1] == "new"
    with pytest.raises(ValueError, match="has no argument"):
        view.update(node, not_an_argument=1)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("name", SPECS)
def test_op_fake_and_kernels_match_the_reference_on_random_inputs(name, rows):
    spec = REGISTRY[name]
    for seed in range(3):
        args = spec.example(torch.Generator().manual_seed(1000 * seed + rows), rows)
        ref = spec.reference(*args)
        torch.testing.assert_close(spec.op(*args), ref, rtol=1e-5, atol=1e-5)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = spec.op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else
                             [mode.from_tensor(t) for t in a] if isinstance(a, list) and a and
                             isinstance(a[0], torch.Tensor) else a for a in args])
        assert fake.shape == ref.shape and fake.dtype == ref.dtype
        if "cpu" in spec.kernels and cpu_supports_kernels():
            target, label = spec.kernels["cpu"](False)
            assert target is not None and target.name().startswith("sparsefx_cpu::") and label == f"cpu.{name}"
            torch.testing.assert_close(target(*args), ref, rtol=1e-4, atol=1e-4)
        if "triton" in spec.kernels and triton_available("cpu") and rows == 1:
            target, _ = spec.kernels["triton"](False)
            torch.testing.assert_close(target(*args), ref, rtol=1e-4, atol=1e-4)


def test_backend_and_cpu_preparation_keep_no_tables_of_their_own():
    """Lowering, the backend and prepare_cpu_decode read the registry: none names an op."""
    from sparsefx.codegen import backend, cpu, eager

    for module in (backend, cpu, eager):
        source = inspect.getsource(module)
        for name in REGISTRY:
            assert f'"{name}"' not in source and f"'{name}'" not in source, (module.__name__, name)
