"""ViCrop: crop where the model's own attention or gradients point, and show it the crop too.

"MLLMs Know Where to Look: Training-Free Perception of Small Visual Details with Multimodal
LLMs", ICLR 2025, arXiv 2502.17422. The importance map (rel-att, grad-att or pure-grad) is read
from the model at the attending position, a box is chosen by sliding windows
(:mod:`innersight.look.boxes`), and the crop is given as a second image after the original with
the same question.

High-resolution images (V*Bench setting, ``tile_max_side``): the image is split into tiles
(:mod:`innersight.look.tiling`), every tile gets its own map (with its own generic-prompt ratio
for rel-att and pure-grad), the tiles of all samples run batched (question and generic prompt
rows together, at most ``max_batch`` rows per forward), the maps are stitched in tile order and
the box is chosen on the stitched map against the full image. An image that fits in one tile is
mapped whole (its own view geometry). The stitched map spans the union of the (equal, nominal)
tiles with uniform cells, each tile's map stretched over its whole tile: exact for processors
that stretch the image (BLIP, Qwen's ``smart_resize``); for a centre-cropping processor
(llava-hf's CLIP, tiles up to 1.5:1 wide) the tile's map really covers its central square only,
the reference's own approximation, kept because the stitched cells must be uniform.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import MethodError
from ..prompts import split_answer_format, with_answer_format
from .tiling import TileGrid

VARIANTS = ("rel-att", "grad-att", "pure-grad")
GENERIC_INSTRUCTION = "Write a general description of the image."
MAP_QUESTIONS = ("short", "full")
#: the benchmarks of the paper's tables, all evaluated with 20 new tokens (reference ``run.py``)
PAPER_BENCHMARKS = ("textvqa", "vstar", "pope", "docvqa", "aokvqa", "gqa", "vqav2")
_CODE = "arXiv 2502.17422 reference code (run.py, utils.process_data)"

#: reference layer as a fraction of decoder depth: LLaVA-1.5 layer 14 of 32 (0-based), the
#: reference code's choice; Qwen2.5-VL 22 of 36; InstructBLIP's LM layer 15 of 32. Published data
#: keyed by family name (the papers' settings, kept beside their source rather than in the
#: adapters): a lookup, not a branch; a family the papers did not evaluate takes
#: :data:`FALLBACK_LAYER_FRACTION`, and any family takes ``layer=`` from the user.
DEFAULT_LAYER_FRACTION = {"llava": 14 / 32, "llava_next": 14 / 32, "instructblip": 15 / 32,
                          "qwen2_vl": 22 / 36, "qwen2_5_vl": 22 / 36}
#: any other family: a little below the middle of the decoder, between LLaVA-1.5's 14/32 (0.44)
#: and InstructBLIP's 15/32 (0.47) reference layers
FALLBACK_LAYER_FRACTION = 0.45


@dataclass(frozen=True)
class ViCropConfig:
    variant: str = field(default="rel-att", metadata={"source": "arXiv 2502.17422 Sec. 3.2"})
    #: 0-based decoder layer whose attention is read; None: the reference layer scaled to depth
    layer: int | None = field(default=None, metadata={"source": "reference code: LLaVA-1.5 14/32"})
    #: base crop side in original pixels; None: the vision encoder's input side (336 for
    #: LLaVA-1.5, 224 for InstructBLIP and Qwen)
    base_size: int | None = field(default=None, metadata={"source": "reference code"})
    ratios: tuple[float, ...] = field(default=(1.0, 1.2, 1.4, 1.6, 1.8, 2.0), metadata={"source": "reference code"})
    generic_instruction: str = field(default=GENERIC_INSTRUCTION, metadata={"source": "arXiv 2502.17422 Sec. 3.2"})
    #: give the generic prompt the answer-format instruction that ends the question ("Answer the
    #: question using a single word or phrase."), joined the same way: q' in the same template as q
    generic_answer_format: bool = field(default=True, metadata={
        "source": _CODE + ": general_prompt = '<general question> Answer the question using a single word or phrase.'"})
    #: which question the maps read: "short", the question's first line with its answer-format
    #: instruction (V*: the question without its option lines, as the reference's short_question),
    #: or "full", the question as asked; the answer is always generated for the full question
    map_question: str = field(default="short", metadata={
        "source": _CODE + ": V* short_question = text.split('\\n')[0]; maps read short_prompt"})
    #: answer length of a benchmark run of the paper's tables (PAPER_BENCHMARKS) when the user
    #: sets none (None: the benchmark preset's); the reference generates max_new_tokens=20
    max_new_tokens: int | None = field(default=20, metadata={"source": _CODE + ": generate(max_new_tokens=20)"})
    #: added to the generic map before dividing (the reference divides by zero in bf16)
    epsilon: float = 1e-6
    #: reproduce the reference quirks: the map is stretched over the whole image even where the
    #: processor showed only a centre crop (and a stitched map over the image itself rather than
    #: over the union of its tiles), and no epsilon
    official: bool = False
    #: InstructBLIP's second stage: index into the Q-Former's cross-attention blocks (block 2 is
    #: Q-Former layer 4 of the released checkpoints); families whose image tokens are patches ignore it.
    #: The name is the one users know; the maps take it as the neutral ``grid_block`` of
    #: :meth:`innersight.adapters.base.Adapter.token_grid`, which decides what it means
    qformer_block: int = field(default=2, metadata={"source": "arXiv 2502.17422 reference code (InstructBLIP)"})
    #: high-resolution mode: split images into tiles at most this many pixels high (V*Bench: 1024)
    #: and stitch the tiles' maps; None (default) maps the whole image at once
    tile_max_side: int | None = field(default=None, metadata={"source": "arXiv 2502.17422 V* setting: 1024"})
    #: most rows (prompts) per forward pass while mapping; tiles and samples are chunked to it
    max_batch: int = 16
    #: crop gate (:mod:`innersight.look.gate`): crop only when the gate map's ``gate_statistic``
    #: reaches this; None (default, the paper: always crop, unless ``gate_confidence`` is set)
    gate: float | None = field(default=None, metadata={"source": "innersight crop gate (look/gate.py)"})
    #: the statistic the gate reads from its map: peak-to-mean, top-mass or concentration
    gate_statistic: str = field(default="peak-to-mean", metadata={"source": "innersight crop gate (look/gate.py)"})
    #: the gate's map: "question", the plain answer's own prefill attention at the map layer (the
    #: early gate: the plain answer is the answer where it does not crop); "rel-att", the full
    #: rel-att map (the post-map gate: every sample pays for the map)
    gate_map: str = field(default="question", metadata={"source": "innersight crop gate (look/gate.py)"})
    #: early gate only: crop only when the plain answer's first-token probability is below this
    #: (None: the confidence does not decide)
    gate_confidence: float | None = field(default=None, metadata={
        "source": "max softmax probability, Hendrycks & Gimpel arXiv 1610.02136"})
    #: early gate only: where the gate crops, keep ViCrop's answer only when its first-token
    #: probability exceeds the plain answer's, else the plain answer stands (False: always keep it)
    gate_arbitrate: bool = field(default=False, metadata={
        "source": "max softmax probability, Hendrycks & Gimpel arXiv 1610.02136 (look/gate.py)"})
    #: encode each image and the prompt prefix holding it once (:mod:`innersight.look.prefix`): the
    #: vision pass and the decoder prefix run for one row and the map's rows continue from its KV
    #: cache (rel-att, pure-grad: the question and generic rows; grad-att: the question, the
    #: prefix without a graph); the answer then continues from that cache too
    #: (:mod:`innersight.look.answer_prefix`). False, or a family it does not apply to: the
    #: map's rows run as full prompts
    shared_prefix: bool = True

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise MethodError(f"vicrop variant must be one of {', '.join(VARIANTS)}, not {self.variant!r}")
        if not self.ratios or any(r <= 0 for r in self.ratios):
            raise MethodError("vicrop ratios must be positive")
        if self.base_size is not None and self.base_size < 1:
            raise MethodError("vicrop base_size must be positive")
        if self.epsilon < 0:
            raise MethodError("vicrop epsilon must be >= 0")
        if self.tile_max_side is not None and (isinstance(self.tile_max_side, bool) or self.tile_max_side < 1):
            raise MethodError("vicrop tile_max_side must be a positive number of pixels (or None)")
        if isinstance(self.max_batch, bool) or self.max_batch < 1:
            raise MethodError("vicrop max_batch must be at least 1")
        if self.map_question not in MAP_QUESTIONS:
            raise MethodError(f"vicrop map_question must be one of {', '.join(MAP_QUESTIONS)}, not {self.map_question!r}")
        if self.max_new_tokens is not None and (isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1):
            raise MethodError("vicrop max_new_tokens must be at least 1 (or None)")
        self._check_gate()

    def _check_gate(self) -> None:
        from .gate import GATE_MAPS, STATISTIC_RANGES

        if self.gate_statistic not in STATISTIC_RANGES:
            raise MethodError(f"vicrop gate_statistic must be one of {', '.join(STATISTIC_RANGES)}, not {self.gate_statistic!r}")
        if self.gate_map not in GATE_MAPS:
            raise MethodError(f"vicrop gate_map must be one of {', '.join(GATE_MAPS)}, not {self.gate_map!r}")
        low, high = STATISTIC_RANGES[self.gate_statistic]
        if self.gate is not None and not low <= self.gate <= high:
            raise MethodError(f"vicrop gate must be a {self.gate_statistic} value in [{low:g}, {high:g}] "
                              "(or None: the map does not decide)")
        if self.gate_confidence is not None and not 0.0 < self.gate_confidence <= 1.0:
            raise MethodError("vicrop gate_confidence must be a probability in (0, 1] (or None)")
        if self.gate_confidence is not None and self.gate_map != "question":
            raise MethodError("vicrop gate_confidence needs the plain answer: gate_map must be 'question'")
        if self.gate_arbitrate and self.gate_map != "question":
            raise MethodError("vicrop gate_arbitrate compares with the plain answer: gate_map must be 'question'")
        if self.variant != "rel-att" and (self.gate is not None or self.gate_confidence is not None
                                          or self.gate_arbitrate):
            # the gate's map is rel-att's layer and projection (and the post-map gate reads rel-att maps)
            raise MethodError("the vicrop crop gate is defined for the rel-att variant only")

    @property
    def rows_per_image(self) -> int:
        """Prompts each image needs in one forward: question and generic prompt, or the question only."""
        return 1 if self.variant == "grad-att" else 2

    def resolve_layer(self, adapter: Any) -> int:
        if self.layer is not None:
            if not 0 <= self.layer < adapter.num_layers:
                raise MethodError(f"vicrop layer {self.layer} outside 0..{adapter.num_layers - 1}")
            return self.layer
        fraction = DEFAULT_LAYER_FRACTION.get(adapter.family, FALLBACK_LAYER_FRACTION)
        return min(adapter.num_layers - 1, round(fraction * adapter.num_layers))

    def resolve_base_size(self, adapter: Any) -> int:
        if self.base_size is not None:
            return self.base_size
        return int(adapter.crop_base_size)


def map_prompt(question: str, config: ViCropConfig) -> str:
    """The question the maps read (:attr:`ViCropConfig.map_question`): ``short`` keeps the first
    line of the question proper and re-attaches its answer-format instruction; ``full`` the
    question as asked."""
    if config.map_question == "full":
        return question
    core, separator, instruction = split_answer_format(question)
    first = core.strip().split("\n", 1)[0].strip() or core
    return with_answer_format(first, separator, instruction)


def generic_prompt(question: str, config: ViCropConfig) -> str:
    """The generic prompt q' paired with ``question``: the generic instruction followed by the
    question's answer-format instruction, joined as in the question
    (:attr:`ViCropConfig.generic_answer_format`)."""
    if not config.generic_answer_format:
        return config.generic_instruction
    _, separator, instruction = split_answer_format(question)
    return with_answer_format(config.generic_instruction, separator, instruction)


@dataclass
class CropResult:
    """What ViCrop decided for one sample."""

    map: np.ndarray  # [rows, cols] importance over the image-token grid
    map_region: tuple[float, float, float, float]  # original-image box the map spans
    box: tuple[float, float, float, float]
    crop: Any  # PIL image
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    #: the tile grid of a high-resolution sample (None: the image was mapped whole)
    tiles: TileGrid | None = None


MapResult = tuple[np.ndarray, Any, dict[str, np.ndarray]]  # (map [rows, cols], view, named raw maps)


def single_image_maps(mllm: Any, images: list[Any], questions: list[str], config: ViCropConfig,
                      template: str = "chat") -> list[MapResult]:
    """The map of each (image, question) computed in one batch, whole images, no tiling."""
    from . import maps as M

    adapter = mllm.adapter
    layer = config.resolve_layer(adapter)
    eps = 0.0 if config.official else config.epsilon
    n = len(questions)
    generic = [generic_prompt(q, config) for q in questions]
    questions = [map_prompt(q, config) for q in questions]
    if config.variant == "rel-att":
        # the question and the generic prompt run as one batch
        batch = mllm.prepare(list(images) * 2, list(questions) + generic, template=template)
        pairs = M.attention_maps(mllm, batch, layer, grid_block=config.qformer_block,
                                 pairs=config.shared_prefix)
        out = []
        for i in range(n):
            (att_q, view), (att_g, _) = pairs[i], pairs[n + i]
            out.append((att_q / (att_g + eps), view, {"question": att_q, "generic": att_g}))
        return out
    if config.variant == "grad-att":
        batch = mllm.prepare(list(images), list(questions), template=template)
        return [(m, view, {"grad-att": m})
                for m, view in M.grad_attention_maps(mllm, batch, layer, grid_block=config.qformer_block,
                                                     shared_prefix=config.shared_prefix)]
    from .pure_grad import pure_grad_maps

    return pure_grad_maps(mllm, images, questions, config, template=template, generic=generic)


def tile_grid_for(image: Any, config: ViCropConfig) -> TileGrid | None:
    """The tile grid of ``image`` in high-resolution mode; None when it is mapped whole (mode
    off, or the image fits in one tile)."""
    from .tiling import tile_grid

    if config.tile_max_side is None:
        return None
    grid = tile_grid(image.size[0], image.size[1], config.tile_max_side)
    return grid if grid.n_tiles > 1 else None


def importance_maps(mllm: Any, images: list[Any], questions: list[str], config: ViCropConfig,
                    template: str = "chat") -> list[MapResult]:
    """The importance map of each (image, question): (map [rows, cols], view, named raw maps).

    In high-resolution mode a tiled image's map is the stitched map of its tiles and its view
    spans :attr:`TileGrid.map_region` (:meth:`TileGrid.stitched_view`). Every image (or tile) is
    mapped by :func:`single_image_maps`, all samples' tiles together, in chunks of at most
    ``config.max_batch`` rows.
    """
    from .tiling import stitch, tiles

    grids = [tile_grid_for(image, config) for image in images]
    jobs: list[tuple[Any, str]] = []  # (image or tile, question), samples in order, tiles row-major
    for image, question, grid in zip(images, questions, grids):
        parts = [image] if grid is None else [crop for _, crop in tiles(image, grid)]
        jobs.extend((part, question) for part in parts)
    per_chunk = max(1, config.max_batch // config.rows_per_image)
    results: list[MapResult] = []
    for start in range(0, len(jobs), per_chunk):
        chunk = jobs[start:start + per_chunk]
        results.extend(single_image_maps(mllm, [j[0] for j in chunk], [j[1] for j in chunk], config, template))
    out: list[MapResult] = []
    index = 0
    for grid in grids:
        if grid is None:
            out.append(results[index])
            index += 1
            continue
        parts = results[index:index + grid.n_tiles]
        index += grid.n_tiles
        stitched = stitch([m for m, _, _ in parts], grid)  # [rows * gh, cols * gw]
        raw = {key: stitch([r[key] for _, _, r in parts], grid) for key in parts[0][2]}
        gh, gw = parts[0][0].shape
        out.append((stitched, grid.stitched_view(gh, gw), raw))
    return out


def choose_crops(mllm: Any, images: list[Any], questions: list[str], config: ViCropConfig,
                 template: str = "chat") -> list[CropResult]:
    """Importance map -> box -> crop for each sample (each sample holds one image)."""
    from .boxes import crop, select_box

    base = config.resolve_base_size(mllm.adapter)
    results = []
    for image, (imap, view, raw) in zip(images, importance_maps(mllm, images, questions, config, template)):
        width, height = image.size
        # default: the map spans the region the model saw (a stitched map: the union of its
        # tiles); official: stretched over the whole image, as the reference does
        region = None if config.official else view.region
        choice = select_box(imap, (width, height), base_size=base, ratios=config.ratios, map_region=region)
        results.append(CropResult(map=imap, map_region=region or (0.0, 0.0, float(width), float(height)),
                                  box=tuple(choice.box), crop=crop(image, choice.box), maps=raw,
                                  tiles=tile_grid_for(image, config)))
    return results


class ViCrop:
    """The input-point method: adds the chosen crop as a second image after the original."""

    point = "input"

    def __init__(self, config: ViCropConfig | None = None):
        self.config = config or ViCropConfig()

    def benchmark_generation(self, benchmark: str) -> dict[str, Any]:
        """Generation defaults for a benchmark run (the user's settings override them): the
        reference's 20 new tokens on the benchmarks of the paper's tables."""
        if self.config.max_new_tokens is None or benchmark not in PAPER_BENCHMARKS:
            return {}
        return {"max_new_tokens": int(self.config.max_new_tokens)}

    #: the registered method name this object was built under (set by the registry; ``vicrop-gated``
    #: is rel-att with a gate), None when built by hand
    registered_name: str | None = None

    @property
    def name(self) -> str:
        """The method's name (``vicrop-rel-att``, ``vicrop-gated``...): the key of its details."""
        return self.registered_name or f"vicrop-{self.config.variant}"

    def apply(self, mllm: Any, image_lists: list[list[Any]], questions: list[str], template: str) -> tuple[list[list[Any]], list[dict[str, Any]]]:
        if any(len(ims) != 1 for ims in image_lists):
            raise MethodError("vicrop works on one image per question")
        from . import gate as G

        if G.early_gate(self.config):  # no generate here: the gate reads one plain forward
            return G.apply_rows(self, mllm, image_lists, questions, template)
        return self.crop_rows(image_lists, questions, mllm, template)

    def crop_rows(self, image_lists: list[list[Any]], questions: list[str], mllm: Any,
                  template: str) -> tuple[list[list[Any]], list[dict[str, Any]]]:
        """Map, box and crop for every sample; the post-map gate (``gate_map="rel-att"``) may
        drop a crop whose map is not sharp enough."""
        from .gate import STATISTICS, keeps_crop

        images = [ims[0] for ims in image_lists]
        results = choose_crops(mllm, images, questions, self.config, template)
        post_map = self.config.gate if self.config.gate_map == "rel-att" else None
        keep = [keeps_crop(r.map, post_map, self.config.gate_statistic) for r in results]
        new_lists = [[im, r.crop] if k else [im] for im, r, k in zip(images, results, keep)]
        extras = [{"box": r.box if k else None, "crop": r.crop if k else None,
                   "maps": {"importance": r.map, **r.maps},
                   "details": {self.name: {"variant": self.config.variant, "box": list(r.box),
                                          "map_region": list(r.map_region),
                                          "tiles": None if r.tiles is None else [r.tiles.rows, r.tiles.cols],
                                          "sharpness": STATISTICS["peak-to-mean"](r.map), "cropped": k}}}
                  for r, k in zip(results, keep)]
        return new_lists, extras

    def answer_rows(self, mllm: Any, image_lists: list[list[Any]], questions: list[str], template: str,
                    generate: Any) -> tuple[list[list[int]], list[str], list[dict[str, Any]], dict[str, Any]]:
        """Answer through the plan's ``generate`` (:meth:`innersight.flow.Plan.run`): behind
        the early gate, plainly first and ViCrop where the gate crops
        (:func:`innersight.look.gate.answer_rows`); otherwise :meth:`apply`, then one generate."""
        if any(len(ims) != 1 for ims in image_lists):
            raise MethodError("vicrop works on one image per question")
        from . import gate as G

        if G.early_gate(self.config):
            return G.answer_rows(self, mllm, image_lists, questions, template, generate)
        from .answer_prefix import answer_rows

        # apply, then one generate (continued from the capture's prefix where exact)
        return answer_rows(self, mllm, image_lists, questions, template, generate)
