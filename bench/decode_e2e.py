"""End-to-end batch-1 decode tokens/s on SmolLM2 (CPU, fp32): dense vs compressed variants, one run.

    python bench/decode_e2e.py                      # dense, TEAL and DAWS at 40/50/60%, DAWS fp16 medium tier
    python bench/decode_e2e.py --recipes teal-50 --rounds 3
    python bench/decode_e2e.py --recipes daws-50 --compile --tag compile   # + torch.compile variants
    python bench/decode_e2e.py --tag quant --recipes rtn-w4-g64 rtn-w3-g64 dam-3.375

Each variant is compressed (calibration: c4, --calib-samples x 512 tokens), prepared for the CPU decode kernel
(``codegen.cpu.prepare_cpu_decode``), then decoded with a lean loop: one forward per token with the HF KV cache
(DynamicCache), no sampling logic. Variants run interleaved, round after round, so machine drift hits all alike;
the table gives median tokens/s and the ratio to dense. Writes bench/results/decode_e2e_<model>.csv/.json.

``dense`` is the model as transformers runs it; ``dense-prepared`` is the same dense model after
``prepare_cpu_decode`` (its linears, the LM head included, re-stored transposed): what the weight layout alone buys,
so the compressed variants' lead over it is what compression buys. Compressed variants are prepared the same way.

``--compile`` adds ``dense+inductor`` (``torch.compile(dense)``, likewise ``dense-prepared+inductor``) and
``<recipe>+sparsefx`` (``torch.compile(model, backend="sparsefx")``: Inductor around the C++ decode kernel) for every
recipe, and compares each compiled model's prompt logits with its eager twin's (max |difference| and top-1 agreement
over the prompt positions), next to the eager model's own change under 1e-7 relative noise on its input embeddings.
The prompt is the start of the eval text: on random token ids, thresholded models are chaotic (in an ad-hoc check,
1e-7 noise changed 44 % of the top-1 predictions of DAWS-50 in eager alone), on text they are not.

Dynamo's guards stay as torch.compile sets them: with guards on nn.Module attributes filtered out, one process
cannot hold two compiled models of one architecture (an entry compiled for one matches the other's calls).
``bench/decode_guards.py`` measures that option, one compiled model per process.

``--int8-activations`` adds a twin of every recipe, suffix ``-q8``, prepared with
``prepare_cpu_decode(int8_activations=True)`` (compiled: the backend's ``int8_activations`` option): its quantized
linears decode with their input rounded to int8 per 32 channels (``ops/quant/cpu.py: quant_matmul_q8``).
Recipes without quantized linears run the same kernels in both twins.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from sparsefx.codegen.cpu import prepare_cpu_decode
from sparsefx.data import PROTOCOL, calibration_batches, eval_windows
from sparsefx.experiments import print_table
from sparsefx.models import load_model
from sparsefx.passes.config import resolve_recipe
from sparsefx.pipeline import compress

from harness import run_meta, write_results


@torch.inference_mode()
def decode_tok_s(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy-decode ``new_tokens`` after ``prompt: [1, P]``; tokens/s of the decode steps (prefill excluded)."""
    out = model(input_ids=prompt, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return new_tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--recipes", nargs="*", default=["teal-40", "daws-40", "teal-50", "daws-50", "daws-50-m40",
                                                     "daws-50-m40-f16", "teal-60"])
    ap.add_argument("--calib-samples", type=int, default=8, help="thresholds only; 8 x 512 tokens suffice for speed")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also torch.compile'd variants (inductor / sparsefx)")
    ap.add_argument("--int8-activations", action="store_true",
                    help="also a twin of every recipe whose quantized linears decode with int8 activations (-q8)")
    ap.add_argument("--no-dense-prepared", action="store_true",
                    help="leave out dense-prepared (the dense model with its linears re-stored for decode)")
    ap.add_argument("--tag", default="", help="results file suffix: decode_e2e[_TAG]_<model>")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dense, tok = load_model(args.model)
    calib = calibration_batches(tok, dataclasses.replace(PROTOCOL, calib_samples=args.calib_samples))
    variants = {"dense": (dense, None)}
    if not args.no_dense_prepared:
        prepared, _ = load_model(args.model)
        prepare_cpu_decode(prepared)
        variants["dense-prepared"] = (prepared, None)
    bits = {}
    for spec in args.recipes:
        model, _ = load_model(args.model)
        recipe = resolve_recipe(spec)
        name = recipe.name or Path(spec).stem
        result = compress(model, recipe, calibration=calib, progress=False)
        prepare_cpu_decode(model)
        effective = next((r.details["effective_sparsity"] for r in reversed(result.reports)
                          if "effective_sparsity" in r.details), None)
        # the first pass that stores bits: the layers' linears (a later pass may requantize only the LM head)
        bits[name] = next((r.details["bits_per_weight"] for r in result.reports if "bits_per_weight" in r.details),
                          None)
        variants[name] = (model, effective)
        if args.int8_activations:
            twin = copy.deepcopy(model)
            prepare_cpu_decode(twin, int8_activations=True)
            variants[f"{name}-q8"], bits[f"{name}-q8"] = (twin, effective), bits[name]
    # the prompt: the start of the eval text (real text: see the module docstring on sensitivity)
    prompt = eval_windows(tok, PROTOCOL)[:1, :args.prompt]
    diffs = {}
    if args.compile:
        # every variant compiles the same HF forward code objects (twice: prompt and decode shapes); keep them all
        # compiled instead of falling back to eager at Dynamo's default recompile limit (8)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(variants))
        for name, (model, effective) in list(variants.items()):
            backend = "inductor" if name.startswith("dense") else "sparsefx"
            options = {"int8_activations": True} if name.endswith("-q8") else None
            compiled = torch.compile(model, backend=backend, options=options)
            with torch.inference_mode():
                a, b = compiled(prompt).logits, model(prompt).logits
                # Thresholded routing is discontinuous: Inductor's reassociated fp32 sums (e.g. in RMSNorm) can move
                # an |x| across a threshold, and the change cascades. As the yardstick, the eager model's own change
                # when its input embeddings get 1e-7 relative noise.
                emb = model.get_input_embeddings()(prompt)
                noise = torch.randn(emb.shape, generator=torch.Generator().manual_seed(1))
                c = model(inputs_embeds=emb * (1 + 1e-7 * noise)).logits
                diffs[f"{name}+{backend}"] = {
                    "max_abs_logit_diff_vs_eager": float((a - b).abs().max()),
                    "top1_agree_vs_eager": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
                    "eager_max_abs_diff_under_1e-7_noise": float((c - b).abs().max())}
            variants[f"{name}+{backend}"] = (compiled, effective)
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    for name, (model, _) in variants.items():  # warm-up (kernel build, allocator, compiles for both shapes)
        decode_tok_s(model, prompt, 4)
    for _ in range(args.rounds):
        for name, (model, _) in variants.items():
            speeds[name].append(decode_tok_s(model, prompt, args.new_tokens))
    base = statistics.median(speeds["dense"])
    rows = []
    for name, (_, effective) in variants.items():
        med = statistics.median(speeds[name])
        bpw = bits.get(name.split("+")[0])
        rows.append({"variant": name, "effective_sparsity": None if effective is None else round(effective, 4),
                     "bits_per_weight": None if bpw is None else round(bpw, 4),
                     "decode_tok_s": round(med, 2), "vs_dense": round(med / base, 3),
                     "min_tok_s": round(min(speeds[name]), 2), "max_tok_s": round(max(speeds[name]), 2),
                     **diffs.get(name, {})})
    print_table(rows, f"{args.model} decode, batch 1, prompt {args.prompt}, {args.new_tokens} new tokens, "
                      f"{torch.get_num_threads()} threads")
    meta = run_meta(**{k: v for k, v in vars(args).items() if k != "out"})  # defaults too, not only what was typed
    write_results(args.out, f"decode_e2e{'_' + args.tag if args.tag else ''}_{args.model}", rows, meta)


if __name__ == "__main__":
    main()
