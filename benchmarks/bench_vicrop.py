"""ViCrop latency, peak memory and batch scaling, relative to a plain answer in the same run.

Same model shapes, image, timing, interleaving, process isolation and memory measure as
``bench_decoding.py`` (its harness is imported from there; read its docstring): ``--shape proxy``
is the CPU proxy of LLaVA-1.5-7B (576 image tokens, the 32064-token vocabulary, decoder 768 wide
x 12 layers), ``--shape 7b --device cuda --dtype bf16`` the real LLaVA-1.5-7B shape on a GPU.
``--isolate none`` runs every variant in one process on one model, interleaved (the order rotated
each round); medians, and the load average is printed.

Variants (each answers ``--batch`` samples, random 640x480 images, per call):

* ``plain``: a plain answer;
* ``rel-att``, ``grad-att``, ``pure-grad``: innersight's ViCrop (rel-att with its shared prefix:
  image and prompt prefix encoded once for the question and generic rows);
* ``rel-att-joint``: rel-att with ``shared_prefix=False`` (the question and generic rows as two
  full rows of one batch), to show what the shared prefix saves;
* ``reference-rel-att`` (batch 1 only): the original code's path: eager attention with every
  layer's attention returned, the question and the generic prompt as two serial passes, then the
  same box and answer.

``--scaling 1,2,4,8`` measures instead the throughput (samples / s) of plain, rel-att, grad-att,
pure-grad, deco and damro at each batch size (all interleaved in one process) and prints it
relative to batch 1 of the same method. ``--capture-memory`` measures the peak memory of the
rel-att pair capture alone (shared prefix and joint) against a plain prefill of the question; with
``--capture-family qwen2_vl`` on a Qwen2-VL of the same decoder (:func:`make_qwen2_vl`: the
shape's decoder and vision sizes, patch 14, merge 2, M-RoPE) and one 1344x1344 image, i.e.
2304 image tokens (issue #16's memory target).

    python benchmarks/bench_vicrop.py --shape proxy --isolate none --repeats 3 --tokens 8 --threads 1
    python benchmarks/bench_vicrop.py --shape proxy --isolate none --scaling 1,2,4,8 --repeats 1
    python benchmarks/bench_vicrop.py --shape 7b --device cuda --dtype bf16 --repeats 5
    python benchmarks/bench_vicrop.py --shape proxy --capture-memory --capture-family qwen2_vl --repeats 3 --threads 2
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decoding import (  # noqa: E402
    QUESTION,
    SHAPES,
    Measurement,
    PeakMemory,
    _load,
    _ratio,
    header,
    measure,
    options_from,
    parser,
    processor_dir,
    random_image,
    random_mllm,
    summarise,
    table,
    timed,
    write_json,
)

VARIANTS = ("plain", "rel-att", "rel-att-joint", "grad-att", "pure-grad", "reference-rel-att")
SCALING_METHODS = ("plain", "rel-att", "grad-att", "pure-grad", "deco", "damro")
#: issue #16's targets on the CPU proxy (whole answer, x plain)
TARGETS = {"rel-att": 2.0, "grad-att": 2.5, "pure-grad": 4.0}


def reference_rel_att(mllm: Any, image: Any, question: str, generation: dict[str, Any]) -> list[int]:
    """The original code's path: eager attention everywhere, all layers' attention returned,
    question and generic prompt as two serial forwards, then the same box and answer."""
    import numpy as np
    import torch

    from innersight.look.boxes import crop, select_box
    from innersight.look.maps import map_view
    from innersight.look.vicrop import ViCropConfig

    config = ViCropConfig()
    layer = config.resolve_layer(mllm.adapter)
    maps = []
    model = mllm.model
    model.set_attn_implementation({"text_config": "eager"})
    try:
        for q in (question, config.generic_instruction):
            batch = mllm.prepare([image], [q])
            with torch.inference_mode():
                out = model(**batch.inputs, output_attentions=True)
            layout = batch.layouts[0][0]
            row = out.attentions[layer][0, :, -1, :].mean(0)  # [L]
            view = map_view(layout)
            maps.append(np.array([[float(row[layout.positions[i]]) for i in r] for r in view.token_index]))
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    imap = maps[0] / (maps[1] + 1e-6)
    choice = select_box(imap, image.size, base_size=config.resolve_base_size(mllm.adapter), map_region=view.region)
    return mllm.answer([image, crop(image, choice.box)], question, **generation).token_ids


def batch_call(mllm: Any, methods: list[str], settings: dict[str, dict[str, Any]] | None, batch: int,
               generation: dict[str, Any]) -> Any:
    """A call answering ``batch`` samples (images seeded 0..batch-1, one question) in one batch."""
    from innersight.methods import resolve_methods

    images = [random_image(seed) for seed in range(batch)]
    questions = [QUESTION] * batch
    plan = resolve_methods(methods, settings)

    def call(extra: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
        answers = plan.run(mllm, images, questions, **generation, **extra)
        # whether each ViCrop answer continued from its map's prefix cache (look/answer_prefix.py)
        reused = [d["answer_prefix"]["reused"] for a in answers for d in a.details.values()
                  if isinstance(d, dict) and "answer_prefix" in d]
        return [t for a in answers for t in a.token_ids], {"batch": batch, "answer_prefix": reused}

    return call


def _reused(measurements: list[Measurement]) -> str:
    """How many of a variant's ViCrop answers continued from the map's prefix ("-": no ViCrop)."""
    flags = [f for m in measurements for f in m.info.get("answer_prefix", [])]
    return f"{sum(flags)}/{len(flags)}" if flags else "-"


def _method(variant: str) -> tuple[list[str], dict[str, dict[str, Any]] | None]:
    if variant == "plain":
        return [], None
    if variant == "rel-att-joint":
        return ["vicrop-rel-att"], {"vicrop-rel-att": {"shared_prefix": False}}
    if variant in ("rel-att", "grad-att", "pure-grad"):
        return [f"vicrop-{variant}"], None
    return [variant], None


def vicrop_calls(mllm: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Every variant of the main table for ``mllm``, ``options["batch"]`` samples per call."""
    tokens = int(options["tokens"])
    generation = {"max_new_tokens": tokens, "min_new_tokens": tokens}
    batch = int(options.get("batch", 1))
    calls = {v: batch_call(mllm, *_method(v), batch, generation) for v in VARIANTS if v != "reference-rel-att"}
    if batch == 1:
        image = random_image(0)
        calls["reference-rel-att"] = lambda extra: (reference_rel_att(mllm, image, QUESTION, {**generation, **extra}), {})
    return calls


def scaling_calls(mllm: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``method@batch`` -> call, for every method of the scaling table and batch size."""
    tokens = int(options["tokens"])
    generation = {"max_new_tokens": tokens, "min_new_tokens": tokens}
    return {f"{m}@{b}": batch_call(mllm, *_method(m), b, generation)
            for m in options.get("methods", SCALING_METHODS) for b in options["scaling"]}


def measure_scaling(options: dict[str, Any]) -> dict[str, list[Measurement]]:
    """The scaling table's calls in one process on one model: one warm-up per method (batch 1),
    then ``repeats`` rounds of every ``method@batch``, the order rotated each round."""
    mllm = _load(options)
    calls = scaling_calls(mllm, options)
    names = [f"{m}@{b}" for m in options["methods"] for b in options["scaling"]]
    for m in options["methods"]:
        calls[f"{m}@{options['scaling'][0]}"]({})  # warm-up
    results: dict[str, list[Measurement]] = {n: [] for n in names}
    for r in range(int(options["repeats"])):
        for name in names[r % len(names):] + names[: r % len(names)]:
            results[name].append(timed(calls[name], options["device"]))
    return results


#: the Qwen2-VL capture-memory image: 1344 / 14 = 96 patches a side, merged 2x2: 48 x 48 = 2304
#: image tokens (``min_pixels = max_pixels = 1344^2``, so ``smart_resize`` keeps it as it is)
QWEN_IMAGE_SIDE = 1344
CAPTURE_FAMILIES = ("llava", "qwen2_vl")


def qwen2_vl_processor_dir(out_dir: Path, side: int = QWEN_IMAGE_SIDE) -> Path:
    """A saved Qwen2-VL processor (test tokenizer, image processor for ``side`` x ``side`` images,
    patch 14, merge 2); the tiny builder writes it beside a throwaway small model, not used."""
    from transformers.utils import logging as hf_logging

    from innersight.testing.tiny import build

    hf_logging.disable_progress_bar()
    return build("qwen2_vl", out_dir, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                 vision_layers=1, min_pixels=side * side, max_pixels=side * side)


def make_qwen2_vl(shape: str, processor_path: str | Path, device: str = "cpu", dtype: str | None = None,
                  seed: int = 0) -> Any:
    """A random-weight ``Qwen2VLForConditionalGeneration`` built in memory with ``shape``'s decoder
    (``proxy``: 768 wide, 12 layers, 12 heads, no grouped KV, MLP 2048, vocabulary 32064, as the
    LLaVA proxy) and a Qwen2-VL vision tower of ``shape``'s vision sizes (``proxy``: 256 wide,
    4 blocks, 8 heads, MLP ratio 2; patch 14, merge 2), wrapped as an :class:`innersight.MLLM`."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from innersight.adapters import adapter_class
    from innersight.testing.tiny.qwen2_vl import default_mrope_section

    s = SHAPES[shape]
    cls = adapter_class("qwen2_vl")
    processor = cls.load_processor(str(processor_path))
    tok = processor.tokenizer
    head_dim = int(s["hidden_size"]) // int(s["num_heads"])
    text = {
        "vocab_size": s["vocab"] or len(tok), "hidden_size": s["hidden_size"],
        "intermediate_size": s["intermediate_size"], "num_hidden_layers": s["num_layers"],
        "num_attention_heads": s["num_heads"], "num_key_value_heads": s["num_heads"],
        "max_position_embeddings": 8192,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                            "mrope_section": default_mrope_section(head_dim)},
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
    }
    vision = {
        "depth": s["vision_layers"], "embed_dim": s["vision_hidden"], "hidden_size": s["hidden_size"],
        "num_heads": s["vision_heads"], "mlp_ratio": int(s["vision_intermediate"]) // int(s["vision_hidden"]),
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    }
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    return random_mllm(Qwen2VLForConditionalGeneration, config, processor, cls, f"random-qwen2-vl-{shape}",
                       device, dtype, seed)


def capture_memory(mllm: Any, device: str, repeats: int = 3, image: Any = None) -> dict[str, float]:
    """Peak memory (MiB, largest of ``repeats``) and median time of the rel-att pair capture
    (shared prefix, joint batch) and of a plain prefill of the question (full forward with its
    KV cache, logits at the last position), one sample (``image``: default a 640x480 one); also
    the image's token count (``image_tokens``) and whether the shared-prefix path ran
    (``shared_ran``, 1.0 or 0.0)."""
    import torch

    from innersight.look.maps import pair_capture
    from innersight.look.vicrop import ViCropConfig, generic_prompt, importance_maps

    image = random_image(0) if image is None else image
    pair = mllm.prepare([[image]] * 2, [QUESTION, generic_prompt(QUESTION, ViCropConfig())])
    shared_ran = pair_capture(mllm, pair, 1) is not None  # else the capture below is the joint batch again
    image_tokens = pair.layouts[0][0].num_tokens
    del pair

    def plain_prefill() -> None:
        batch = mllm.prepare([image], [QUESTION])
        with torch.inference_mode():
            mllm.model(**batch.inputs, use_cache=True, logits_to_keep=1)

    runs = {
        "plain-prefill": plain_prefill,
        "capture-shared": lambda: importance_maps(mllm, [image], [QUESTION], ViCropConfig()),
        "capture-joint": lambda: importance_maps(mllm, [image], [QUESTION], ViCropConfig(shared_prefix=False)),
    }
    out: dict[str, float] = {}
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in runs.items():
            memory = PeakMemory(device)
            memory.start()
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0, memory.stop()))
    for name, values in samples.items():
        out[f"{name}_s"] = statistics.median(t for t, _ in values)
        out[f"{name}_mb"] = max(m for _, m in values)
    out["image_tokens"] = float(image_tokens)
    out["shared_ran"] = float(shared_ran)
    return out


def _print_capture_memory(mem: dict[str, float]) -> None:
    """One line per run of :func:`capture_memory`: median s, peak MiB, x the plain prefill's peak."""
    base = mem["plain-prefill_mb"]
    for name in ("plain-prefill", "capture-shared", "capture-joint"):
        print(f"{name:<16}{mem[name + '_s']:>9.3f} s{mem[name + '_mb']:>10.1f} MB"
              f"{_ratio(mem[name + '_mb'], base):>8.2f}x plain prefill mem")


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=1, help="samples per call in the main table")
    p.add_argument("--scaling", default=None, help="batch sizes, e.g. 1,2,4,8: the batch-scaling table instead")
    p.add_argument("--variants", default=None, help="variants of the main table (default: all; plain always)")
    p.add_argument("--methods", default=None, help="methods of the scaling table (default: all of SCALING_METHODS)")
    p.add_argument("--capture-memory", action="store_true", help="rel-att pair-capture memory vs a plain prefill")
    p.add_argument("--capture-family", choices=CAPTURE_FAMILIES, default="llava",
                   help="--capture-memory on LLaVA-1.5 (576 image tokens) or Qwen2-VL (2304 image tokens)")
    p.add_argument("--qwen-side", type=int, default=QWEN_IMAGE_SIDE,
                   help="--capture-family qwen2_vl: the square image's side, a multiple of 28 (1344: 2304 tokens)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.capture_memory and args.capture_family == "qwen2_vl":
            import torch

            side = args.qwen_side
            if side < 28 or side % 28:
                raise SystemExit("--qwen-side must be a positive multiple of 28 (patch 14 x merge 2)")
            options = options_from(args, qwen2_vl_processor_dir(Path(tmp) / "processor", side))
            torch.set_num_threads(int(options["threads"]))
            mllm = make_qwen2_vl(args.shape, options["processor_dir"], args.device, args.dtype)
            image = random_image(0).resize((side, side))
            mem = capture_memory(mllm, args.device, args.repeats, image=image)
            print(header(args) + f" family=qwen2_vl image={side}x{side} image_tokens={int(mem['image_tokens'])} "
                  f"shared_prefix_ran={bool(mem['shared_ran'])} load_after={os.getloadavg()[0]:.1f}")
            _print_capture_memory(mem)
            write_json(args.json, args, {}, {}, capture_memory=mem)
            return 0
        options = options_from(args, processor_dir(args.shape, Path(tmp) / "processor"))
        options["batch"] = args.batch
        if args.capture_memory:
            mllm = _load(options)
            mem = capture_memory(mllm, args.device, args.repeats)
            print(header(args) + f" family=llava image_tokens={int(mem['image_tokens'])} "
                  f"shared_prefix_ran={bool(mem['shared_ran'])} load_after={os.getloadavg()[0]:.1f}")
            _print_capture_memory(mem)
            write_json(args.json, args, {}, {}, capture_memory=mem)
            return 0
        if args.scaling:
            options["scaling"] = [int(b) for b in args.scaling.split(",")]
            methods = args.methods.split(",") if args.methods else list(SCALING_METHODS)
            options["methods"] = methods
            results = measure_scaling(options)
            print(header(args) + f" load_after={os.getloadavg()[0]:.1f}")
            sizes = options["scaling"]
            print("throughput relative to batch 1 of the same method (samples/s in brackets)")
            print(f"{'method':<12}" + "".join(f"{'batch ' + str(b):>22}" for b in sizes))
            scaling: dict[str, dict[int, float]] = {}
            for m in methods:
                tput = {b: b / statistics.median(c.total_s for c in results[f"{m}@{b}"]) for b in sizes}
                scaling[m] = tput
                print(f"{m:<12}" + "".join(f"{tput[b] / tput[sizes[0]]:>13.2f}x ({tput[b]:.3f})" for b in sizes))
            # the time to the first token (image processing, maps, crop, prefill) per sample: what
            # batching must cut for a prefill-bound method to scale
            print("time to the first token per sample, relative to batch 1 of the same method (s per sample in brackets)")
            for m in methods:
                first = {b: statistics.median(c.first_s for c in results[f"{m}@{b}"]) / b for b in sizes}
                print(f"{m:<12}" + "".join(f"{first[b] / first[sizes[0]]:>13.2f}x ({first[b]:.3f})" for b in sizes))
            print("CPU seconds per sample, relative to batch 1 of the same method (CPU s per sample in brackets; "
                  "less sensitive to other tenants than wall time)")
            for m in methods:
                cpu = {b: statistics.median(c.cpu_s for c in results[f"{m}@{b}"]) / b for b in sizes}
                print(f"{m:<12}" + "".join(f"{cpu[b] / cpu[sizes[0]]:>13.2f}x ({cpu[b]:.3f})" for b in sizes))
            reuse = {name: _reused(results[name]) for name in results if _reused(results[name]) != "-"}
            if reuse:
                print("answer continued from the map's prefix: " + ", ".join(f"{k} {v}" for k, v in reuse.items()))
            write_json(args.json, args, {}, results, scaling={m: {str(b): v for b, v in t.items()} for m, t in scaling.items()})
            return 0
        variants = [v for v in (args.variants.split(",") if args.variants else VARIANTS)
                    if args.batch == 1 or v != "reference-rel-att"]
        if "plain" not in variants or set(variants) - set(VARIANTS):
            raise SystemExit(f"--variants: plain and any of {', '.join(VARIANTS)}")
        results = measure(vicrop_calls, variants, options)
    rows = summarise(results)

    def target(name: str, r: dict[str, Any]) -> str:
        return f"<= {TARGETS[name]:.2f}x" if name in TARGETS else ""

    def x_ref(name: str, r: dict[str, Any]) -> str:
        ref = rows.get("reference-rel-att")
        return f"{_ratio(r['total_s'], ref['total_s']):.2f}" if ref else ""

    print(header(args) + f" batch={args.batch} load_after={os.getloadavg()[0]:.1f}")
    print(table(rows, {"x reference (total)": x_ref, "proxy target (total)": target,
                       "answer from prefix": lambda name, r: _reused(results[name])}))
    if "rel-att" in rows and "rel-att-joint" in rows:
        same = rows["rel-att"]["token_ids"] == rows["rel-att-joint"]["token_ids"]
        print(f"rel-att shared prefix / joint: total x{_ratio(rows['rel-att']['total_s'], rows['rel-att-joint']['total_s']):.2f}, "
              f"same answer tokens: {same}")
    write_json(args.json, args, rows, results, targets=TARGETS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
