"""The sequential pipeline on a GPU: blocks onloaded one at a time, the artifact as on CPU (run by
bench/gpu_session.sh when a GPU is lent)."""

import pytest
import torch

from sparsefx.models import tiny_model
from sparsefx.passes.config import Recipe
from sparsefx.pipeline import compress

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
RECIPE = Recipe.from_yaml("calibration: {batch_size: 2}\npasses:\n  - {method: wanda, sparsity: 0.5, roles: [q, k, v, o]}"
                          "\n  - {method: gptq, bits: 4, group_size: 32, roles: [gate, up, down]}\n")


def _calib():
    return torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(1))


def test_blocks_onloaded_to_the_gpu_give_the_cpu_result(tokens):
    cpu, gpu = tiny_model("llama"), tiny_model("llama")
    compress(cpu, RECIPE, calibration=_calib(), progress=False, sequential=True)
    torch.cuda.reset_peak_memory_stats()
    compress(gpu, RECIPE, calibration=_calib(), progress=False, sequential=True, device="cuda")
    assert torch.cuda.max_memory_allocated() > 0
    assert all(p.device.type == "cpu" for p in gpu.parameters())      # offloaded back after their turn
    with torch.no_grad():
        a, b = cpu(tokens).logits, gpu(tokens).logits
    # fp32 sums in another order: a few weights may land on the other side of a mask or rounding boundary
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


def test_cli_compress_on_cuda_then_load_on_cuda(tiny_checkpoint, calib_text, tmp_path):
    import sparsefx
    from sparsefx.cli import main

    out = tmp_path / "w50"
    assert main(["compress", str(tiny_checkpoint()), "-r", "wanda-50", "-o", str(out), "--calib-file",
                 str(calib_text), "--sequential", "--device", "cuda", "--no-progress"]) == 0
    model = sparsefx.load(out, dtype=torch.bfloat16, device="cuda")
    assert next(model.parameters()).device.type == "cuda"
    ids = torch.tensor([[1, 2, 3]], device="cuda")
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 6)
