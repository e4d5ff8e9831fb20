"""The ``torch.compile`` backend ``"sparsefx"``: bind a compression plan, lower compressed ops to kernels, Inductor
for the rest.

    model = sparsefx.load("out/daws50")                         # compressed modules call sparsefx::* ops
    model.forward = torch.compile(model.forward, backend="sparsefx")
    model.generate(ids, max_new_tokens=32)                       # KV cache and all

    dense = AutoModelForCausalLM.from_pretrained(...)           # or: a dense model and an artifact's plan
    fast = torch.compile(dense, backend="sparsefx", options={"artifact": "out/daws50"})

Stages, on each graph Dynamo hands over:
  1. bind (``options["artifact"]``): Dynamo lifts parameters to graph inputs; each input's source names the
     parameter (``L['self']._modules['model']...._parameters['weight']`` -> ``model.layers.0...weight``). Every
     ``linear`` whose weight the artifact compressed is replaced by the eager module that ``sparsefx.load`` would
     build (``EAGER_KINDS[kind].restore`` — the same code), so the plan applies by parameter name.
  2. lower: after AOT tracing (Inductor's ``post_grad_custom_pre_pass``, or directly with ``inductor: False``) each
     ``sparsefx::*`` node is retargeted to its kernel: ``sparsefx::triton_*`` on CUDA (or on CPU under
     ``TRITON_INTERPRET=1`` when ``kernels: triton`` is asked for), the C++ CPU kernels on CPU (registered on the
     ops themselves, so CPU nodes keep their target).
  3. compile: Inductor compiles the rest around the opaque kernel ops (``inductor: False``: AOT-traced graph, eager).

If a stage fails, the backend logs a warning and runs Dynamo's graph eagerly — the model still computes the same
thing, only without the kernels. ``counters`` counts what was bound and lowered (tests assert on it).

Options: ``kernels`` (``auto`` | ``triton`` | ``cpu`` | ``reference``), ``artifact`` (path), ``inductor`` (bool),
``int8_activations`` (bool; CPU quantized linears decode with x rounded to int8, see ``ops/quant/cpu.py``).
"""

from __future__ import annotations

import collections
import json
import logging
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn
from torch.fx import GraphModule

from ..errors import ArtifactError, RecipeError
from .. import ops as ops_package
from ..ops import spec_for_target
from ..ops.triton_support import available
from .cpu import enable_cpu_kernels
from .eager import EAGER_KINDS

log = logging.getLogger(__name__)

counters: collections.Counter = collections.Counter()

KERNELS = ("auto", "triton", "cpu", "reference")
_OPS_SOURCES = tuple(sorted(str(p) for p in Path(ops_package.__file__).parent.glob("*/__init__.py")))


@dataclass(frozen=True)
class BackendOptions:
    """``torch.compile(..., backend="sparsefx", options={...})``."""

    kernels: str = "auto"
    artifact: str | None = None
    inductor: bool = True
    int8_activations: bool = False   # CPU: quantized linears decode with x rounded to int8 (ops/quant/cpu.py)

    def __post_init__(self):
        if self.kernels not in KERNELS:
            raise RecipeError(f"sparsefx backend: kernels must be one of {KERNELS}, got {self.kernels!r}")
        for name in ("inductor", "int8_activations"):
            if not isinstance(getattr(self, name), bool):
                raise RecipeError(f"sparsefx backend: {name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, options: dict | None) -> "BackendOptions":
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise RecipeError(f"sparsefx backend: unknown option(s) {unknown}; known: {sorted(known)}")
        if options.get("artifact") is not None:
            options["artifact"] = str(options["artifact"])
        return cls(**options)

    def kernel_family(self, device: torch.device) -> str:
        """What ``auto`` means on ``device``: Triton on CUDA when installed, the C++ kernels on CPU."""
        if self.kernels != "auto":
            return self.kernels
        if device.type == "cuda":
            return "triton" if available(device) else "reference"
        return "cpu" if device.type == "cpu" else "reference"


# ---------------------------------------------------------------- 1. bind an artifact's plan by parameter name

_SOURCE_KEY = re.compile(r"\[['\"]([^'\"]+)['\"]\]")
_LINEAR_TARGETS = {torch._C._nn.linear, torch.nn.functional.linear}


def parameter_names(gm: GraphModule) -> dict[str, str]:
    """``{placeholder name: HF parameter name}`` for the inputs Dynamo lifted from module parameters.

    Example:
        >>> parameter_names(gm)["l_self_modules_lm_head_parameters_weight_"]  # doctest: +SKIP
        'lm_head.weight'
    """
    out = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        if source is None:
            continue
        name = getattr(source, "name", None)            # a property in recent torch, a method in older releases
        text = name() if callable(name) else str(name)
        if "_parameters" not in text and "_buffers" not in text:
            continue
        keys = _SOURCE_KEY.findall(text)
        # drop the root (``self``, the module Dynamo started from) — names are relative to it, as in state_dict()
        out[node.name] = ".".join(keys[1:])
    return out


class _ArtifactPlan:
    """The compressed modules of an artifact, read with safetensors (never unpickled)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open
        from safetensors.torch import load_file

        self.path = Path(path)
        plan_file = self.path / "compressed.json"
        if not plan_file.is_file():
            raise ArtifactError(f"{self.path}: no compressed.json — this artifact has no compressed modules to bind "
                                "(weight masks edit the weights: load it with sparsefx.load() and compile that model)")
        if (self.path / "structure.json").is_file():
            raise ArtifactError(f"{self.path}: a structurally pruned artifact changes shapes and cannot be bound to a "
                                "dense model's graph; load it with sparsefx.load() and compile that model")
        self.entries: dict[str, dict] = json.loads(plan_file.read_text())
        self.tensors = load_file(self.path / "compressed.safetensors")
        self._weights = safe_open(str(self.path / "model.safetensors"), framework="pt")
        self._weight_keys = set(self._weights.keys())

    def state(self, module: str) -> dict[str, torch.Tensor]:
        return {k[len(module) + 1:]: v for k, v in self.tensors.items() if k.startswith(module + ".")}

    def stored(self, param: str) -> torch.Tensor | None:
        return self._weights.get_tensor(param) if param in self._weight_keys else None


def _stub_linear(weight: torch.Tensor, bias: torch.Tensor | None, stored_w, stored_b) -> nn.Module:
    """An ``nn.Linear`` holding the live tensors where they equal the artifact's (no copy), else the artifact's."""
    def pick(live, stored):
        if stored is None or (live is not None and live.shape == stored.shape
                              and torch.equal(live.detach().cpu(), stored.to(live.dtype))):
            return live
        return stored.to(live.device if live is not None else "cpu")

    w = pick(weight, stored_w)
    stub = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    stub.weight = nn.Parameter(w, requires_grad=False)
    if bias is not None:
        stub.bias = nn.Parameter(pick(bias, stored_b), requires_grad=False)
    return stub


def _copy_dynamo_graph(gm: GraphModule) -> GraphModule:
    """A copy of Dynamo's graph module to edit (Dynamo reads its own graph's placeholders after the backend
    returns), carrying what AOT autograd expects of a Dynamo graph: each input's ``_dynamo_source``, the
    parameter sources and the compile id."""
    graph = torch.fx.Graph()
    val_map: dict[torch.fx.Node, torch.fx.Node] = {}
    out = graph.graph_copy(gm.graph, val_map)
    graph.output(out)
    for old, new in val_map.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    new_gm = GraphModule(gm, graph)
    new_gm.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new_gm._param_name_to_source = gm._param_name_to_source
    return new_gm


def bind_artifact(gm: GraphModule, example_inputs: list, path: str | Path) -> tuple[GraphModule, list[torch.Tensor]]:
    """A copy of ``gm`` where each ``linear`` whose weight the artifact at ``path`` compressed is the op call of the
    artifact's eager module. The compressed tensors become new trailing inputs: returns the graph and them."""
    plan = _ArtifactPlan(path)
    gm = _copy_dynamo_graph(gm)
    names = parameter_names(gm)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    live = {p.name: example_inputs[i] for i, p in enumerate(placeholders) if i < len(example_inputs)}
    bound: set[str] = set()
    extra: list[torch.Tensor] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _LINEAR_TARGETS:
            continue
        w_node = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        b_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        param = names.get(getattr(w_node, "name", None), "")
        module = param[:-len(".weight")] if param.endswith(".weight") else None
        entry = plan.entries.get(module) if module else None
        if entry is None:
            continue
        cls = EAGER_KINDS.get(entry["kind"])
        if cls is None or not hasattr(cls, "restore"):
            raise ArtifactError(f"{plan.path}: {module} is a {entry['kind']!r}, which this sparsefx cannot bind")
        bias = live.get(b_node.name) if b_node is not None else None
        stub = _stub_linear(live[w_node.name], bias, plan.stored(param),
                            plan.stored(module + ".bias") if b_node is not None else None)
        restored = cls.restore(stub, entry["attrs"], plan.state(module))
        out = _inline(gm, node, restored, "sparsefx_bound_" + module.replace(".", "_"), node.args[0],
                      extra)
        out.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        bound.add(module)
    missing = set(plan.entries) - bound
    kinds = {plan.entries[m]["kind"] for m in missing}
    if missing and kinds - {"thresholded_act"}:
        log.warning("sparsefx backend: %d compressed module(s) of %s are not in this graph (e.g. %s)", len(missing),
                    plan.path, sorted(missing)[0])
    if "thresholded_act" in kinds:
        raise ArtifactError(f"{plan.path}: thresholded activations (CATS) have no parameter to bind them by; load "
                            "the artifact with sparsefx.load() and compile that model")
    gm.graph.lint()
    gm.recompile()
    counters["bound"] += len(bound)
    return gm, extra


def _inline(gm: GraphModule, node: torch.fx.Node, module: nn.Module, prefix: str, x: torch.fx.Node,
            extra: list[torch.Tensor]) -> torch.fx.Node:
    """Insert ``module``'s forward (an op call on its tensors) before ``node``; return the output node.

    The module's tensors become new graph inputs (appended to ``extra``; the backend passes them on every call):
    a parameter or constant added to Dynamo's graph would lack the source and fake tensor that AOT tracing and
    Inductor expect of every tensor they did not get as an input.
    """
    traced = torch.fx.symbolic_trace(module)
    tensors = {**dict(traced.named_parameters()), **dict(traced.named_buffers())}
    last_input = list(gm.graph.find_nodes(op="placeholder"))[-1]
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    out = None
    for n in traced.graph.nodes:
        if n.op == "placeholder":
            env[n] = x
        elif n.op == "get_attr":
            with gm.graph.inserting_after(last_input):
                last_input = env[n] = gm.graph.placeholder(f"{prefix}_{n.target.replace('.', '_')}")
            last_input._dynamo_source = None        # an input the user's code never saw (AOT allows None)
            extra.append(tensors[n.target].detach())
        elif n.op == "output":
            out = env[n.args[0]]
        else:
            with gm.graph.inserting_before(node):
                env[n] = gm.graph.node_copy(n, lambda a: env[a])
    return out


# ---------------------------------------------------------------- 2. lower compressed ops to kernels

def lower_graph(graph: torch.fx.Graph, family: str, int8_activations: bool = False) -> collections.Counter:
    """Retarget every compressed op node of ``graph`` to the kernel of ``family`` that its ``OpSpec`` names
    (``kernels[family]``; ``sparsefx/ops``); return counts per op: ``<family>.<op>`` for a node retargeted (CPU with
    ``int8_activations``: the quantized ops' ``_q8`` twins, whose decode rounds x to int8 per 32 inputs, counted as
    ``cpu.<op>_q8``), ``reference.<op>`` for one left on the op's own implementation (no kernel for ``family``, or
    it cannot run here).

    Example:
        >>> lower_graph(gm.graph, "triton")  # doctest: +SKIP
        Counter({'triton.tiered_linear': 210})
    """
    lowered: collections.Counter = collections.Counter()
    if family == "cpu":
        enable_cpu_kernels()
    targets: dict[str, tuple] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        spec = spec_for_target(node.target)
        if spec is None:
            continue
        if spec.name not in targets:
            loader = spec.kernels.get(family)
            targets[spec.name] = loader(int8_activations) if loader is not None else (None, None)
        target, label = targets[spec.name]
        if target is not None:
            node.target = target
            lowered[label] += 1
        else:
            lowered[f"reference.{spec.name}"] += 1
    counters.update(lowered)
    return lowered


def _lowering_pass(family: str, int8_activations: bool):
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class LowerCompressedOps(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            lower_graph(graph, family, int8_activations)

        def uuid(self):
            # Inductor's graph cache keys on this: the lowering is this file plus the registry's kernel loaders
            return (family, int8_activations, get_hash_for_files((__file__, *_OPS_SOURCES)))

    return LowerCompressedOps()


# ---------------------------------------------------------------- 3. the backend

def _device(example_inputs) -> torch.device:
    for t in example_inputs:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def sparsefx_backend(gm: GraphModule, example_inputs, options: dict | None = None, **_):
    """Dynamo backend (registered as ``"sparsefx"`` through the ``torch_dynamo_backends`` entry point)."""
    opts = BackendOptions.from_dict(options)                   # bad options are the caller's error: raise
    family = opts.kernel_family(_device(example_inputs))
    if family == "triton":
        if not available(_device(example_inputs)):
            log.warning("sparsefx backend: Triton kernels cannot run on %s; using the reference ops",
                        _device(example_inputs))
            family = "reference"
    extra: list[torch.Tensor] = []
    if opts.artifact is not None:
        gm, extra = bind_artifact(gm, example_inputs, opts.artifact)  # a bad artifact is an error, not a fallback
    try:
        compiled = _compile(gm, [*example_inputs, *_static_fakes(extra)], family, opts.inductor,
                            opts.int8_activations)
    except torch._dynamo.exc.RestartAnalysis:
        raise     # Dynamo's own control flow (it re-traces, e.g. with scalars made tensors), not a failure
    except Exception as exc:   # lowering or compiling failed: the graph still runs, without kernels
        log.warning("sparsefx backend: could not compile this graph (%s: %s); running it eagerly",
                    type(exc).__name__, str(exc)[:300])
        counters["fallback"] += 1
        compiled = gm.forward
    if not extra:
        return compiled
    return lambda *args: compiled(*args, *extra)


def _static_fakes(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Bound tensors as static-shape fake tensors of Dynamo's fake mode: AOT would otherwise give the new inputs
    symbolic sizes that no guard can name (they have no source in the user's code)."""
    ctx = torch._guards.TracingContext.try_get()
    fake_mode = getattr(ctx, "fake_mode", None)
    if fake_mode is None or not tensors:
        return tensors
    return [fake_mode.from_tensor(t, static_shapes=True) for t in tensors]


def _compile(gm: GraphModule, example_inputs: list, family: str, inductor: bool, int8_activations: bool):
    if inductor:
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches={"post_grad_custom_pre_pass": _lowering_pass(family, int8_activations)})
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def lower_and_run(fx_gm, _inputs):
        lower_graph(fx_gm.graph, family, int8_activations)
        fx_gm.recompile()
        return make_boxed_func(fx_gm.forward)

    return aot_autograd(fw_compiler=lower_and_run)(gm, example_inputs)


__all__ = ["BackendOptions", "bind_artifact", "counters", "lower_graph", "parameter_names", "sparsefx_backend"]
