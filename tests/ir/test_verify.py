import pytest
import torch

from sparsefx.ir import IRError, LINEAR, linear_nodes, verify


def test_fresh_graph_verifies(annotated_llama):
    _, gm = annotated_llama
    verify(gm)


def test_resized_weight_without_annotation_update_is_caught(annotated_llama):
    _, gm = annotated_llama
    proj = gm.get_submodule("hf.model.layers.0.mlp.up_proj")
    proj.weight = torch.nn.Parameter(proj.weight[:-3].clone())
    with pytest.raises(IRError, match="up_proj.weight has shape"):
        verify(gm)


def test_missing_shape_metadata_is_caught(annotated_llama):
    _, gm = annotated_llama
    del linear_nodes(gm)[2].meta["val"]
    with pytest.raises(IRError, match="no meta\\['val'\\]"):
        verify(gm)


def test_missing_annotation_is_caught(annotated_llama):
    _, gm = annotated_llama
    del linear_nodes(gm)[0].meta[LINEAR]
    with pytest.raises(IRError, match="lacks meta"):
        verify(gm)
