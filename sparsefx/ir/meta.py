"""Every metadata key sparsefx writes on an FX graph, in one place: ``gm.meta`` keys (the graph) and ``node.meta``
keys (one node). Values are described beside each key; ``ir/README.md`` states the invariants they carry."""

from __future__ import annotations

from torch.fx import GraphModule

# gm.meta
SOURCE = "sparsefx.source"                  # "export" or "dynamo": how the graph was captured
PARAM_PREFIX = "sparsefx.prefix"            # prefix of parameter targets inside the graph module ("" or "model.")
MODEL_TYPE = "sparsefx.model_type"          # the HF config's model_type
EXAMPLE = "sparsefx.example_inputs"         # small example inputs, to re-propagate shapes
LAYERS = "sparsefx.layers"                  # {layer index: LayerInfo}, after annotate
STAGES = "sparsefx.stages"                  # stages provided so far ("annotated", "calibrated", ...), in order
DEPGRAPH = "sparsefx.depgraph"              # the dependency graph of coupled dimensions (networkx)
PLAN = "sparsefx.structure_plan"            # StructurePlan of a structured pass: groups, removal order, level

# node.meta (STATS is also a gm.meta key: input node name -> ActStats)
LINEAR = "sparsefx.linear"                  # LinearInfo of an annotated linear
STATS = "sparsefx.stats"                    # ActStats of a linear's input, after calibrate
MASK = "sparsefx.mask"                      # what a weight mask did to the linear
TIERS = "sparsefx.tiers"                    # DAWS thresholds and predicted tier fractions
QUANT = "sparsefx.quant"                    # {"bits", "group_size", "symmetric", "bytes"} of a quantized linear
LOWRANK = "sparsefx.lowrank_quant"          # {"rank", "bits_per_weight", ...} of a low-rank + quant linear
CATS = "sparsefx.cats"                      # {"t", "p"} on CATS's threshold nodes
MODULE = "sparsefx.module"                  # the HF module a non-linear compressed node replaces (e.g. an act_fn)
KNOB = "sparsefx.knob"                      # set only while the greedy allocation runs


def param_prefix(gm: GraphModule) -> str:
    """The prefix of ``gm``'s parameter targets (``""`` when it was never set)."""
    return gm.meta.get(PARAM_PREFIX, "")
