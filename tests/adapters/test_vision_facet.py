"""The adapters' vision facet (issue 15 item 1): every facet on every family, hand-checked where a
number can be computed (layer indices, the [CLS] flag, sequence lengths, tile rows, pooled scores,
token counts), against the model's own vision path where it cannot, and the base class's clear
refusals for a family that does not state a fact."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from innersight.adapters import FAMILIES
from innersight.adapters.base import Adapter
from innersight.adapters.qwen2_vl import Qwen2VLAdapter, Qwen25VLAdapter
from innersight.errors import MethodError

QUESTIONS = ["what is it?", "is there a dog in the picture?"]
#: hand-computed from the tiny configs (testing/tiny): (vision layers, outlier layer, [CLS], heads,
#: sequence length of one scored view, candidates per image for a 90x60 image)
#: LLaVA: 56 px / patch 14 = 4x4 patches, vision_feature_layer -2 of 2 layers -> layers[0];
#: LLaVA-NeXT: 28 px tiles, 2x2 patches per tile, -2 of 2 -> layers[0];
#: InstructBLIP: 32 px / patch 8 = 4x4, the Q-Former reads layers[1], DAMRO one below: layers[0];
#: Qwen: 90x60 -> smart_resize 84x56 -> a 6x4 patch grid, 3x2 = 6 merged tokens, last block 1;
#: LLaVA-OneVision: 42 px tiles / patch 14 = 3x3 patches of SigLIP (no [CLS]), vision_feature_layer
#: -1 of 2 layers -> layers[1]; the base view is scored, one candidate per base patch
#: InternVL: 32 px tiles / patch 8 = 4x4 patches (+ CLS), vision_feature_layer -1 of 2 -> layers[1],
#: candidates the global tile's 2x2 pixel-shuffled tokens
#: SmolVLM: 48 px frames / patch 8 = 6x6 patches (no [CLS]) scored on the global frame, the
#: connector reads the last of 2 layers (layers[1]), 2x2 patches a token: 3x3 = 9 candidates
FACTS = {
    "llava": (2, 0, True, 4, 17, 16),
    "llava_next": (2, 0, True, 4, 5, 4),
    "instructblip": (2, 0, True, 4, 17, 16),
    "qwen2_vl": (2, 1, False, 2, 24, 6),
    "qwen2_5_vl": (2, 1, False, 2, 24, 6),
    "llava_onevision": (2, 1, False, 4, 9, 9),
    "internvl": (2, 1, True, 2, 17, 4),
    "smolvlm": (2, 1, False, 2, 36, 9),
}
#: families whose vision tower runs a base view and tiles per image (the base view scored)
TILED = ("llava_next", "llava_onevision")
#: InternVL tiles (testing/tiny, tests/adapters/test_internvl.py): 90x60 -> 2x2 tiles + thumbnail = 5
#: rows of pixel_values; 50x80 -> 1x2 tiles + thumbnail = 3; the thumbnail is each image's last row
INTERNVL_TILES = {(90, 60): 5, (50, 80): 3}
#: the attribute of a vision layer that holds its self-attention, where it is not ``self_attn``
ATTENTION_ATTR = {"qwen2_vl": "attn", "qwen2_5_vl": "attn", "internvl": "attention"}
#: Gemma 3: 64 px / patch 8 = 8x8 SigLIP patches (no CLS), the projector reads the last of 2 layers
#: (layers[1]), 2x2 patches average-pooled into each of the 4x4 = 16 LM tokens
FACTS["gemma3"] = (2, 1, False, 2, 64, 16)
#: Qwen3-VL (patch 16, merge 2: multiples of 32): 90x60 -> 96x64 -> 6x4 patches, 3x2 merged, last block 1
FACTS["qwen3_vl"] = (2, 1, False, 2, 24, 6)
ATTENTION_ATTR["qwen3_vl"] = "attn"
#: families whose LM image tokens pool several vision patches (scores averaged per token)
POOLED = ("qwen2_vl", "qwen2_5_vl", "gemma3", "qwen3_vl")


def _image(seed: int, w: int = 90, h: int = 60) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _capture(mllm, batch, modules, read=None):
    """Run the model once and record, per module: its input (args, kwargs) and ``read(output)``,
    taken inside the hook (a model may rewrite its vision output object afterwards: Qwen splits
    ``pooler_output`` per image in place)."""
    seen: dict = {}

    def pre(name):
        def hook(mod, args, kwargs):
            seen.setdefault(name, {})["in"] = (args, dict(kwargs))
        return hook

    def post(name):
        def hook(mod, args, output):
            seen.setdefault(name, {})["out"] = read(output) if read is not None else output
        return hook

    handles = []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(module.register_forward_hook(post(name)))
    try:
        with torch.no_grad():
            mllm.model(**batch.inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


# ---------------------------------------------------------------------- layer, [CLS], attention
@pytest.mark.parametrize("family", FAMILIES)
def test_outlier_layer_cls_flag_and_attention_module_by_hand(tiny_mllm, family):
    adapter = tiny_mllm(family).adapter
    n_layers, layer, cls, _, _, _ = FACTS[family]
    assert len(adapter.vision_layers) == n_layers
    assert adapter.outlier_vision_layer == layer
    assert adapter.vision_has_cls is cls
    for i in range(n_layers):
        module = adapter.vision_attention(i)
        block = adapter.vision_layers[i]
        assert module is getattr(block, ATTENTION_ATTR.get(family, "self_attn"))
    for bad in (-1, n_layers):
        with pytest.raises(MethodError, match="outside"):
            adapter.vision_attention(bad)


def _fake_qwen(cls, depth: int, full) -> Qwen2VLAdapter:
    """A Qwen adapter over a stand-in model: a config and a list of ``depth`` vision blocks."""
    adapter = object.__new__(cls)
    visual = SimpleNamespace(blocks=list(range(depth)))
    config = SimpleNamespace(vision_config=SimpleNamespace(fullatt_block_indexes=full))
    adapter.model = SimpleNamespace(config=config, model=SimpleNamespace(visual=visual))
    return adapter


def test_qwen_outlier_layer_is_the_last_full_attention_block_by_hand():
    # Qwen2.5-VL-7B: 32 blocks, full attention at 7, 15, 23, 31; the merger reads block 31
    assert _fake_qwen(Qwen25VLAdapter, 32, [7, 15, 23, 31]).outlier_vision_layer == 31
    # a last block that is windowed: the deepest full-attention block below it
    assert _fake_qwen(Qwen25VLAdapter, 10, [3, 7]).outlier_vision_layer == 7
    assert _fake_qwen(Qwen25VLAdapter, 10, [3, 7]).vision_full_attention_layers == (3, 7)
    # Qwen2-VL: every block attends over whole images
    assert _fake_qwen(Qwen2VLAdapter, 6, None).vision_full_attention_layers == tuple(range(6))
    assert _fake_qwen(Qwen2VLAdapter, 6, None).outlier_vision_layer == 5


# ---------------------------------------------------------------------- queries, keys, scored views
@pytest.mark.parametrize("family", FAMILIES)
def test_queries_keys_and_scored_views_by_hand(tiny_mllm, family):
    """Shapes of q/k per family, the scored views (one per image; LLaVA-NeXT: the base tile of
    each image), and the [CLS]-row softmax over a view equal to a per-head hand computation."""
    mllm = tiny_mllm(family)
    adapter = mllm.adapter
    _, layer, cls, heads, length, _ = FACTS[family]
    batch = mllm.prepare([_image(0), _image(1, 50, 80)], QUESTIONS)
    module = adapter.vision_attention(layer)
    seen = _capture(mllm, batch, {"attn": module})["attn"]
    args, kwargs = seen["in"]
    hidden = args[0] if args else kwargs["hidden_states"]
    with torch.no_grad():
        q, k = adapter.vision_query_key(module, hidden, kwargs)
        views = adapter.vision_attention_per_image(batch, q, k, kwargs)
    assert q.shape == k.shape and q.dim() == 4 and q.shape[1] == heads
    assert len(views) == 2
    first_len = int(views[0][0].shape[1])
    assert first_len == length  # the 90x60 image's scored view, hand-computed above
    for vq, vk in views:
        assert vq.shape[0] == heads and vq.shape == vk.shape
    if family in TILED:
        tiles = adapter.tiles_per_image(batch)
        expected = []
        for size in batch.image_sizes:
            lay = adapter.anyres_layout(size[0])
            best_h, best_w = lay.best_resolution
            expected.append(best_h // adapter.tile_size * (best_w // adapter.tile_size) + 1)  # + the base view
        assert tiles == expected and q.shape[0] == sum(tiles)
        assert adapter.scored_vision_rows(batch, sum(tiles)).tolist() == [0, tiles[0]]
        torch.testing.assert_close(views[1][0], q[tiles[0]])
    elif family == "internvl":
        first, second = INTERNVL_TILES[(90, 60)], INTERNVL_TILES[(50, 80)]
        assert q.shape[0] == first + second  # every tile of both images
        assert adapter.scored_vision_rows(batch, first + second).tolist() == [first - 1, first + second - 1]
        torch.testing.assert_close(views[0][0], q[first - 1])  # the thumbnail, each image's last tile
        torch.testing.assert_close(views[1][0], q[first + second - 1])
    elif family == "smolvlm":
        # 90x60 -> 96x64 -> a 96x96 canvas: 2x2 tiles + the global frame; 50x80 -> 60x96 -> the same
        assert adapter.frames_per_image(batch) == [5, 5] and q.shape[0] == 10
        assert adapter.scored_vision_rows(batch, 10).tolist() == [4, 9]  # each image's global frame, last
        torch.testing.assert_close(views[0][0], q[4])
        torch.testing.assert_close(views[1][1], k[9])
    elif family.startswith("qwen"):  # Qwen: one flat sequence, images bounded by cu_seqlens
        bounds = kwargs["cu_seqlens"].tolist()
        assert bounds[1] - bounds[0] == length
        torch.testing.assert_close(views[1][0], q[0][:, bounds[1]:bounds[2]])
    else:  # one vision sequence per image ([CLS] first where there is one; Gemma 3: patches only)
        assert adapter.scored_vision_rows(batch, 2).tolist() == [0, 1]
        torch.testing.assert_close(views[1][0], q[1])
    with pytest.raises(MethodError):
        adapter.scored_vision_rows(batch, 7)


@pytest.mark.parametrize("family", FAMILIES)
def test_pooled_scores_per_candidate_by_hand(tiny_mllm, family):
    mllm = tiny_mllm(family)
    adapter = mllm.adapter
    *_, length, candidates = FACTS[family]
    batch = mllm.prepare([_image(0)], QUESTIONS[:1])
    per_token = torch.arange(length - (1 if adapter.vision_has_cls else 0), dtype=torch.float32)  # [P]
    pooled = adapter.pool_vision_scores(batch, 0, per_token)
    assert pooled.shape == (candidates,)
    if family == "internvl":
        # 4x4 patches row-major, pixel shuffle folds each 2x2 block into one token: token (0, 0)
        # holds patches 0, 1, 4, 5, (0, 1) 2, 3, 6, 7, (1, 0) 8, 9, 12, 13, (1, 1) 10, 11, 14, 15
        torch.testing.assert_close(pooled, torch.tensor([2.5, 4.5, 10.5, 12.5]))
        with pytest.raises(MethodError, match="patch scores"):
            adapter.pool_vision_scores(batch, 0, per_token[:-1])
        return
    if family == "smolvlm":
        # patches 0..35 row-major on a 6x6 frame; token (r, c) = the mean of patches
        # (2r + i) * 6 + 2c + j, i, j in {0, 1}: token 0 = (0 + 1 + 6 + 7) / 4 = 3.5, ...
        expected = [3.5, 5.5, 7.5, 15.5, 17.5, 19.5, 27.5, 29.5, 31.5]
        torch.testing.assert_close(pooled, torch.tensor(expected))
        return
    if family not in POOLED:
        torch.testing.assert_close(pooled, per_token)  # one candidate per patch
        return
    # Qwen, Gemma 3: the mean over the 2x2 patches of each LM token, in tower order
    owner = adapter.vision_patch_token_index(batch, 0).tolist()
    expected = [sum(p for p in range(length) if owner[p] == m) / owner.count(m) for m in range(candidates)]
    assert all(owner.count(m) == 4 for m in range(candidates))
    torch.testing.assert_close(pooled, torch.tensor(expected))
    if family == "gemma3":
        # by hand: patch (i, j) of the 8x8 grid scores 8i + j; token (r, c) pools patches 2r..2r+1 x
        # 2c..2c+1, whose mean is 8(2r + 0.5) + (2c + 0.5) = 16r + 2c + 4.5
        by_hand = torch.tensor([16.0 * r + 2 * c + 4.5 for r in range(4) for c in range(4)])
        torch.testing.assert_close(pooled, by_hand)


# ---------------------------------------------------------------------- candidates and re-encoding
@pytest.mark.parametrize("family", FAMILIES)
def test_candidates_are_the_models_own_tokens_and_the_full_subset_reencodes_to_the_image(tiny_mllm, family):
    """Candidates from the source module's output: LLaVA and Qwen, the image's own LM tokens;
    LLaVA-NeXT, the base view's packed tokens; InstructBLIP, the ViT patches ([CLS] in front with
    ``with_prefix``). Re-encoding every candidate gives the image's features back (InstructBLIP:
    the whole ViT output through the Q-Former is ``get_image_features``)."""
    mllm = tiny_mllm(family)
    adapter = mllm.adapter
    *_, candidates = FACTS[family]
    batch = mllm.prepare([_image(0), _image(1, 50, 80)], QUESTIONS)

    def read(output):
        raw = output.last_hidden_state.clone() if hasattr(output, "last_hidden_state") else None
        return (adapter.vision_candidates(batch, output), adapter.vision_candidates(batch, output, with_prefix=True),
                raw)

    cands, full, raw = _capture(mllm, batch, {"source": adapter.vision_subset_source}, read)["source"]["out"]
    with torch.no_grad():
        feats = adapter.image_features(batch, batch.inputs["pixel_values"])
    assert len(cands) == len(feats) == 2 and cands[0].shape[0] == candidates
    for i in range(2):
        assert feats[i].shape[0] == batch.layouts[i][0].num_tokens
    if family == "instructblip":
        assert adapter.vision_subset_source is adapter.vision_tower and adapter.vision_subset_prefix == 1
        vit = raw  # [N, 1 + P, Dv]
        for i in range(2):
            torch.testing.assert_close(cands[i], vit[i, 1:])
            torch.testing.assert_close(full[i], vit[i])
        with torch.no_grad():
            again = adapter.encode_vision_subset(batch, full)  # the whole ViT output: the model's own path
        for i in range(2):
            assert again[i].shape == (adapter.num_query_tokens, feats[i].shape[-1])
            torch.testing.assert_close(again[i], feats[i], atol=1e-5, rtol=1e-4)
        return
    assert adapter.vision_subset_prefix == 0 and [f.shape for f in full] == [c.shape for c in cands]
    with torch.no_grad():
        again = adapter.encode_vision_subset(batch, cands)
    for i in range(2):
        if family == "smolvlm":  # the global frame's 9 tokens close the image's 5 frames of tokens
            torch.testing.assert_close(cands[i], feats[i][4 * 9:])
            torch.testing.assert_close(again[i], cands[i])
        elif family in TILED:
            p2 = adapter.patches_per_side ** 2
            torch.testing.assert_close(cands[i], feats[i][:p2])  # the base view leads the packed tokens
            torch.testing.assert_close(again[i], torch.cat([cands[i], adapter.image_newline[None]]))
        elif family == "internvl":
            torch.testing.assert_close(cands[i], feats[i][-candidates:])  # the thumbnail's tokens come last
            torch.testing.assert_close(again[i], cands[i])
        else:
            torch.testing.assert_close(cands[i], feats[i])
            torch.testing.assert_close(again[i], cands[i])


def test_llava_onevision_multi_image_samples_are_one_vision_row_each_and_features_follow_the_model(tiny_mllm):
    """LLaVA-OneVision tiles an image only when it is alone in its sample: a two-image sample's
    images are one vision row each (the padded square), scored and re-encoded on that row, and
    ``image_features`` (which passes ``batch_num_images``) gives exactly the tokens the model
    itself splices into the prompt; without ``batch_num_images`` the model would tile them."""
    mllm = tiny_mllm("llava_onevision")
    adapter = mllm.adapter
    batch = mllm.prepare([[_image(0), _image(1, 50, 80)], _image(2, 70, 70)], QUESTIONS)
    # 70x70 alone: best of the 42-px pinpoints is 84x84 -> 2x2 tiles + the base view
    tiles = adapter.tiles_per_image(batch)
    assert tiles == [1, 1, 5]
    assert adapter.scored_vision_rows(batch, 7).tolist() == [0, 1, 2]
    module = adapter.vision_attention(adapter.outlier_vision_layer)
    seen = _capture(mllm, batch, {"attn": module, "lm": adapter.language_model})
    args, kwargs = seen["attn"]["in"]
    hidden = args[0] if args else kwargs["hidden_states"]
    assert hidden.shape[:2] == (7, 9)  # [rows, p*p] every tile of every image, no [CLS]
    with torch.no_grad():
        q, k = adapter.vision_query_key(module, hidden, kwargs)
        views = adapter.vision_attention_per_image(batch, q, k, kwargs)
        feats = adapter.image_features(batch, batch.inputs["pixel_values"])
    for view, row in zip(views, [0, 1, 2]):
        torch.testing.assert_close(view[0], q[row])
    # the model's own spliced image tokens, read at each layout's positions
    embeds = seen["lm"]["in"][1]["inputs_embeds"]  # [B, L, D]
    flat = [(b, lay) for b, row in enumerate(batch.layouts) for lay in row]
    # shared: 9 + 1 newline each; alone: 9 + the 6x6 high-res grid pooled to 4x4 (anyres_max_2), 4 x (4 + 1)
    assert [f.shape[0] for f in feats] == [lay.num_tokens for _, lay in flat] == [10, 10, 9 + 20]
    for f, (b, lay) in zip(feats, flat):
        torch.testing.assert_close(f, embeds[b, torch.as_tensor(lay.positions)])
    # a shared sample's image: p*p base tokens, then its one newline (index p*p)
    newline = adapter.image_newline
    for i in (0, 1):
        torch.testing.assert_close(feats[i][9], newline)
    torch.testing.assert_close(feats[2][:9], embeds[1, torch.as_tensor(flat[2][1].positions)][:9])
    # without the images per sample the model tiles every image (other token counts)
    with torch.no_grad():
        tiled = mllm.model.get_image_features(batch.inputs["pixel_values"], image_sizes=batch.inputs["image_sizes"],
                                              return_dict=True).pooler_output
    assert [t.shape[0] for t in tiled][:2] != [10, 10]
    # candidates from the projector's output: the base rows' tokens; re-encoded with one newline
    cands = _capture(mllm, batch, {"src": adapter.vision_subset_source},
                     lambda out: adapter.vision_candidates(batch, out))["src"]["out"]
    assert [c.shape[0] for c in cands] == [9, 9, 9]
    again = adapter.encode_vision_subset(batch, [c[:3] for c in cands])
    for i in range(3):
        torch.testing.assert_close(cands[i], feats[i][:9])
        torch.testing.assert_close(again[i], torch.cat([cands[i][:3], newline[None]]))


def test_llava_full_strategy_keeps_the_cls_in_front_of_the_candidates(tiny_mllm):
    adapter = tiny_mllm("llava").adapter
    config = adapter.config
    before = config.vision_feature_select_strategy
    try:
        config.vision_feature_select_strategy = "full"
        assert adapter.vision_subset_prefix == 1
        output = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)  # [rows, 1 + P, D]
        batch = SimpleNamespace(image_sizes=[[(90, 60)], [(90, 60)]])
        cands = adapter.vision_candidates(batch, output)
        torch.testing.assert_close(cands[1], output[1, 1:])
        torch.testing.assert_close(adapter.vision_candidates(batch, output, with_prefix=True)[1], output[1])
    finally:
        config.vision_feature_select_strategy = before
    assert adapter.vision_subset_prefix == 0


# ---------------------------------------------------------------------- pixels and query maps
@pytest.mark.parametrize("family", FAMILIES)
def test_vision_input_index_and_query_patch_blocks(tiny_mllm, family):
    mllm = tiny_mllm(family)
    adapter = mllm.adapter
    batch = mllm.prepare([_image(0), _image(1, 50, 80)], QUESTIONS)
    pixels = batch.inputs["pixel_values"]
    where = [adapter.vision_input_index(batch, i) for i in range(2)]
    if family.startswith("qwen"):
        # Qwen2-VL / 2.5-VL (multiples of 28): 90x60 -> 6x4 patches = 24 rows; 50x80 -> smart_resize
        # 56x84 -> 4x6 = 24 rows. Qwen3-VL (multiples of 32): 90x60 -> 96x64 -> 24 rows; 50x80 ->
        # round(50 / 32) = 2, round(80 / 32) = round(2.5) = 2 -> 64x64 -> 4x4 = 16 rows
        second = 16 if family == "qwen3_vl" else 24
        assert where == [slice(0, 24), slice(24, 24 + second)] and pixels.shape[0] == 24 + second
    elif family == "internvl":
        first, second = INTERNVL_TILES[(90, 60)], INTERNVL_TILES[(50, 80)]
        assert where == [slice(0, first), slice(first, first + second)] and pixels.shape[0] == first + second
        alone = mllm.prepare([_image(0)], QUESTIONS[:1])
        alone.image_sizes = [[(90, 60)], [(90, 60)]]  # two images claimed, one image's tiles of pixels
        with pytest.raises(MethodError, match=f"pixel_values hold {first} tiles"):
            adapter.vision_input_index(alone, 0)
    elif family == "smolvlm":  # [B, F_max, 3, S, S]: sample, then the image's 5 frames (2x2 tiles + global)
        assert where == [(0, slice(0, 5)), (1, slice(0, 5))] and pixels.shape[:2] == (2, 5)
        alone = mllm.prepare([_image(0)], QUESTIONS[:1])
        alone.image_sizes = [[(90, 60)], [(90, 60)]]  # two samples claimed, one row of pixels
        with pytest.raises(MethodError, match="pixel_values hold 1"):
            adapter.vision_input_index(alone, 1)
        # 200x40 -> 96x20 -> a 96x48 canvas: 1x2 tiles + the global frame, after the first image's 5
        two = mllm.prepare([[_image(0), _image(2, 200, 40)]], QUESTIONS[:1])
        assert [adapter.vision_input_index(two, i) for i in range(2)] == [(0, slice(0, 5)), (0, slice(5, 8))]
    else:
        assert where == [0, 1]
        alone = mllm.prepare([_image(0)], QUESTIONS[:1])
        alone.image_sizes = [[(90, 60)], [(90, 60)]]  # two images claimed, one row of pixels
        with pytest.raises(MethodError, match="pixel_values hold 1"):
            adapter.vision_input_index(alone, 0)
    expected_blocks = 2 if family == "instructblip" else 0  # tiny Q-Former: 2 layers, cross-attention in each
    assert adapter.query_patch_blocks == expected_blocks
    if expected_blocks:
        assert adapter.query_patch_blocks == len(adapter.qformer_cross_attention_layers)
    else:
        assert batch.layouts[0][0].views[0].token_index is not None  # LM image tokens are grid cells


# ---------------------------------------------------------------------- the base class's refusals
class _Bare(Adapter):
    """A family that states nothing of its vision path beyond the abstract contract."""

    family = "bare"
    architectures = ("BareForConditionalGeneration",)

    def __init__(self, tower, layers):
        self.model = SimpleNamespace(config=SimpleNamespace())
        self.processor = None
        self._tower, self._layers = tower, layers

    @property
    def language_model(self):
        return None

    @property
    def vision_tower(self):
        return self._tower

    @property
    def vision_layers(self):
        return self._layers

    def num_image_tokens(self, batch, image_index, size):
        return 0

    def views(self, batch, image_index, size):
        return ()


def test_base_refuses_unknown_facts_naming_the_family():
    bare = _Bare(SimpleNamespace(), [SimpleNamespace(mixer=None)])
    with pytest.raises(MethodError, match="bare.*vision_has_cls"):
        bare.vision_has_cls  # noqa: B018
    with pytest.raises(MethodError, match="bare.*vision_subset_source"):
        bare.vision_subset_source  # noqa: B018
    with pytest.raises(MethodError, match="bare.*self_attn"):
        bare.vision_attention(0)
    with pytest.raises(MethodError, match="bare.*vision_query_key"):
        bare.vision_query_key(SimpleNamespace(qkv=None), torch.zeros(1, 2, 4), {})
    assert bare.query_patch_blocks == 0 and bare.vision_subset_prefix == 0


def test_base_has_no_decoder_injections():
    """A family that states nothing adds no image rows inside its decoder: every hook is a no-op,
    and rows handed to it are refused naming the family."""
    bare = _Bare(SimpleNamespace(), [])
    assert bare.image_injection_layers == ()
    assert bare.vision_candidate_injections(None, None) is None
    assert bare.language_model_injections({"deepstack_visual_embeds": [torch.zeros(1, 2)]}) is None
    with bare.injecting(torch.zeros(1, 3, dtype=torch.long), None):
        pass
    with pytest.raises(MethodError, match="bare.*injections"):
        with bare.injecting(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 1, 2)):
            pass
    with bare.residual_additions() as added:
        assert added(0) is None


def test_base_defaults_follow_the_clip_siglip_convention():
    """A SigLIP-like tower (embeddings without class_embedding) has no [CLS]; a CLIP-like one has;
    separate q_proj / k_proj give [N, H, L, d] queries and keys, one head per d columns."""
    siglip = _Bare(SimpleNamespace(vision_model=SimpleNamespace(embeddings=SimpleNamespace())), [])
    clip = _Bare(SimpleNamespace(embeddings=SimpleNamespace(class_embedding=torch.zeros(4))), [])
    assert siglip.vision_has_cls is False and clip.vision_has_cls is True
    proj = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(4))
    attn = SimpleNamespace(q_proj=proj, k_proj=lambda x: 2 * x, num_heads=2)
    layer = SimpleNamespace(self_attn=attn)
    assert _Bare(SimpleNamespace(), [layer]).vision_attention(0) is attn
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)  # [N, L, D]
    q, k = clip.vision_query_key(attn, hidden, {})
    assert q.shape == (2, 2, 3, 2)  # [N, H, L, d]
    torch.testing.assert_close(q[1, 1, 2], hidden[1, 2, 2:])  # head 1 = columns 2..3
    torch.testing.assert_close(k, 2 * q)
    # the scored view of each image is its own row; one candidate per token
    batch = SimpleNamespace(image_sizes=[[(8, 8)], [(8, 8)]])
    views = clip.vision_attention_per_image(batch, q, k, {})
    torch.testing.assert_close(views[1][0], q[1])
    scores = torch.tensor([0.5, 0.25, 0.25])
    assert clip.pool_vision_scores(batch, 0, scores) is scores
