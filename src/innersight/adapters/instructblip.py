"""InstructBLIP (``InstructBlipForConditionalGeneration``, Salesforce ``instructblip-vicuna-*``).

Image -> BLIP ViT (``vision_model``; CLS + 16x16 patches for 224 px / patch 14) ->
``post_layernorm`` -> Q-Former (``num_query_tokens`` learned queries, which also read the
instruction text, cross-attend to the ViT tokens every ``cross_attention_frequency`` layers) ->
``language_projection`` -> ``num_query_tokens`` language-model tokens per image, placed where the
``<image>`` placeholders are. The LM tokens are queries, not patches: the patch grid is reported
as a view without ``token_index``; maps over the grid go through the Q-Former cross-attention.

Facts read from transformers 5.x:

* ``model.language_model`` is a whole ``LlamaForCausalLM`` (with its own ``lm_head``); the decoder
  stack is ``model.language_model.model`` (``.layers``, ``.norm``, ``.embed_tokens``).
* The Q-Former consumes ``vision_model(...).last_hidden_state``, which is
  ``post_layernorm(hidden_states[-1])``: the ViT's last layer output plus one LayerNorm
  (``hidden_states`` itself is not normed; it has ``1 + num_hidden_layers`` entries).
* ``qformer_outputs.cross_attentions`` (eager attention) holds one ``[N, heads, Q, 1 + P]`` entry
  per Q-Former layer *that has* cross-attention, in layer order; entry ``k`` is Q-Former layer
  :attr:`InstructBlipAdapter.qformer_cross_attention_layers` ``[k]``. ViCrop's "block index 2"
  is entry 2 (Q-Former layer 4 of the real models). ``qformer_outputs.attentions`` mixes self-
  and cross-attention weights (its recorder matches both module names).
* The processor prepends ``num_query_tokens`` ``<image>`` tokens once per prompt, before the
  padding, whatever the number of images, and gives the Q-Former one text row per prompt; the
  model needs one Q-Former row per image. Several images per prompt therefore fail in the
  processor's output (a size mismatch in ``torch.cat`` inside ``get_image_features``), and with
  the rows repeated but too few ``<image>`` tokens ``masked_scatter`` silently drops the extra
  images. This adapter builds the inputs itself (:meth:`InstructBlipAdapter._process`):
  ``num_query_tokens`` placeholders per image, images in prompt order, one Q-Former row per
  image (the prompt's own text), left padding of the whole sequence. For one image per prompt
  the result is token-for-token what the processor gives, padding placement aside.
* Each cross-attention is an ``InstructBlipQFormerMultiHeadAttention`` at
  ``qformer.encoder.layer[i].crossattention.attention``, called with keyword arguments only
  (``hidden_states`` = the ``num_query_tokens`` query states, ``encoder_hidden_states`` = the
  ViT tokens, ``encoder_attention_mask``); its probabilities are
  ``softmax(query(h) key(e)^T * scaling + mask)`` per head (``eager_attention_forward`` of
  modeling_instructblip.py, softmax in the model dtype, no fp32 upcast). Under SDPA (the default)
  the weights are never returned: :meth:`InstructBlipAdapter.record_query_patch_attention`
  recomputes them from the module's own projections in a forward hook, leaving the model's
  attention implementation alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..errors import MethodError, UnsupportedModelError, UserInputError
from ..prompts import split_answer_format
from .base import Adapter, Batch, TokenGrid
from .geometry import GridView, processed_region

if TYPE_CHECKING:  # pragma: no cover
    import torch


class InstructBlipAdapter(Adapter):
    family = "instructblip"
    architectures = ("InstructBlipForConditionalGeneration",)
    # ViCrop's evaluation prompt for InstructBLIP; the query placeholders are added by _process
    reference_template = "Question: {question} Short answer:"

    def __init__(self, model: Any, processor: Any):
        if not getattr(model.config, "use_decoder_only_language_model", True):
            raise UnsupportedModelError(
                "InstructBLIP with an encoder-decoder language model (Flan-T5) is not supported; "
                "use a decoder-only checkpoint such as Salesforce/instructblip-vicuna-7b"
            )
        super().__init__(model, processor)
        qtok = self.qformer_tokenizer
        if qtok is not None:
            # the Q-Former numbers text positions from 0 whatever the padding: right padding keeps
            # each prompt's positions the same alone and in a batch
            qtok.padding_side = "right"

    # ------------------------------------------------------------------ modules
    @property
    def causal_lm(self) -> Any:
        """The whole ``...ForCausalLM`` language model (decoder stack + ``lm_head``)."""
        return self.model.language_model

    @property
    def generation_module(self) -> Any:
        """InstructBLIP's ``generate`` embeds the images itself, then calls the inner language
        model's ``generate`` (transformers 5.23): per-step forwards run on ``causal_lm``."""
        return self.causal_lm

    @property
    def language_model(self) -> Any:
        """The decoder stack (``LlamaModel``: ``.layers``, ``.norm``, ``.embed_tokens``)."""
        return self.causal_lm.model

    @property
    def lm_head(self) -> Any:
        return self.causal_lm.lm_head

    @property
    def vision_tower(self) -> Any:
        """The BLIP ViT (``InstructBlipVisionModel``); its token 0 is CLS, then the patches."""
        return self.model.vision_model

    @property
    def vision_feature_layer(self) -> int:
        """The Q-Former reads the ViT's last layer: ``post_layernorm(hidden_states[-1])``."""
        return -1

    @property
    def projector_vision_layers(self) -> tuple[int, ...]:
        """The Q-Former cross-attends to ``post_layernorm`` of the ViT's last layer's output."""
        return (len(self.vision_layers) - 1,)

    @property
    def vision_post_layernorm(self) -> Any:
        """The LayerNorm applied to the ViT's last hidden state before the Q-Former reads it."""
        return self.vision_tower.post_layernorm

    @property
    def qformer(self) -> Any:
        """The Q-Former (``InstructBlipQFormerModel``)."""
        return self.model.qformer

    @property
    def query_tokens(self) -> Any:
        """The learned queries, ``[1, num_query_tokens, qformer_hidden]``."""
        return self.model.query_tokens

    @property
    def projector(self) -> Any:
        """The linear map from Q-Former outputs to language-model embeddings."""
        return self.model.language_projection

    @property
    def qformer_tokenizer(self) -> Any:
        return getattr(self.processor, "qformer_tokenizer", None)

    # ------------------------------------------------------------------ sizes
    @property
    def num_query_tokens(self) -> int:
        return int(self.config.num_query_tokens)

    @property
    def qformer_cross_attention_layers(self) -> tuple[int, ...]:
        """Indices of the Q-Former layers with cross-attention to the ViT, in layer order.

        ``qformer_outputs.cross_attentions[k]`` belongs to layer ``qformer_cross_attention_layers[k]``.
        """
        qc = self.config.qformer_config
        freq = int(qc.cross_attention_frequency)
        return tuple(i for i in range(int(qc.num_hidden_layers)) if i % freq == 0)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of the ViT patch grid (16x16 for 224 px / patch 14)."""
        vc = self.config.vision_config
        size, patch = vc.image_size, vc.patch_size
        h, w = (size, size) if isinstance(size, int) else (size[0], size[1])
        ph, pw = (patch, patch) if isinstance(patch, int) else (patch[0], patch[1])
        return int(h) // int(ph), int(w) // int(pw)

    @property
    def num_vision_prefix_tokens(self) -> int:
        """Tokens before the patches in the ViT sequence (and the Q-Former's keys): the CLS."""
        return 1

    @property
    def image_token_id(self) -> int:
        token_id = getattr(self.config, "image_token_index", None)
        if token_id is None:
            token_id = self.tokenizer.convert_tokens_to_ids(str(self.processor.image_token))
        return int(token_id)

    # ------------------------------------------------------------------ prompts and inputs
    def reference_question(self, question: str) -> str:
        """The reference template's ``Short answer:`` cue replaces an answer-format instruction:
        ViCrop's reference prompt is ``Question: <question> Short answer:`` with no instruction."""
        return split_answer_format(question)[0]

    def image_placeholder(self, num_images: int) -> str:
        """Empty: the query placeholders are prepended when the inputs are built."""
        return ""

    def _process(self, flat_images: list, prompts: list[str], counts: list[int]) -> Any:
        """Build ``input_ids`` / ``attention_mask`` (left-padded), ``qformer_input_ids`` /
        ``qformer_attention_mask`` (one right-padded row per image) and ``pixel_values``.

        Sample ``b`` becomes ``[pad...] + [<image>] * (num_query_tokens * counts[b]) + tokens(prompt)``.
        """
        import torch
        from transformers import BatchFeature

        if not flat_images:
            raise UserInputError(
                "InstructBLIP needs at least one image: its language model sees images only through "
                "the Q-Former queries and has no text-only path"
            )
        tok, qtok = self.tokenizer, self.qformer_tokenizer
        if qtok is None:
            raise UserInputError("this InstructBLIP processor has no qformer_tokenizer")
        text_ids = tok(prompts, add_special_tokens=True)["input_ids"]
        rows = [[self.image_token_id] * (self.num_query_tokens * n) + list(ids) for ids, n in zip(text_ids, counts)]
        length = max(len(r) for r in rows)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), length), int(pad_id), dtype=torch.long)  # [B, L]
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)  # [B, L]
        for b, row in enumerate(rows):
            input_ids[b, length - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, length - len(row):] = 1
        qenc = qtok(prompts, padding=True, return_tensors="pt", return_token_type_ids=False)
        repeats = torch.tensor(counts, dtype=torch.long)
        qformer_input_ids = qenc["input_ids"].repeat_interleave(repeats, dim=0)  # [N_img, Lq]
        qformer_attention_mask = qenc["attention_mask"].repeat_interleave(repeats, dim=0)  # [N_img, Lq]
        pixel_values = self.processor.image_processor(flat_images, return_tensors="pt")["pixel_values"]
        return BatchFeature({
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "qformer_input_ids": qformer_input_ids,
            "qformer_attention_mask": qformer_attention_mask,
            "pixel_values": pixel_values,  # [N_img, 3, S, S]
        })

    # ------------------------------------------------------------------ layouts
    def num_image_tokens(self, batch: Batch, image_index: int, size: tuple[int, int]) -> int:
        return self.num_query_tokens

    def views(self, batch: Batch, image_index: int, size: tuple[int, int]) -> tuple[GridView, ...]:
        """The ViT patch grid over the region the processor showed (BLIP stretches: the whole image)."""
        rows, cols = self.patch_grid
        region = processed_region(size[0], size[1], self.processor.image_processor)
        return (GridView("vit_patches", rows, cols, region, None),)

    def decoder_hidden_states(self, outputs: Any) -> tuple[Any, ...]:
        """InstructBLIP nests the language model's outputs."""
        return outputs.language_model_outputs.hidden_states

    def pixel_view(self, batch: Batch, tensor: torch.Tensor, sample: int) -> tuple[torch.Tensor, GridView]:
        """``pixel_values`` is ``[N_images, 3, S, S]`` (images in batch order): sample ``sample``'s
        first image ``[3, S, S]`` and its ``vit_patches`` view (BLIP stretches the whole image)."""
        first = sum(len(sizes) for sizes in batch.image_sizes[:sample])
        return tensor[first], batch.layouts[sample][0].views[0]

    # ------------------------------------------------------------------ text and map facet
    @property
    def text_only_module(self) -> Any:
        """The language model alone (``causal_lm``, e.g. Vicuna): the whole model's forward
        requires an image, since its language model sees images only through the Q-Former
        queries."""
        return self.causal_lm

    @property
    def token_grid_blocks(self) -> int:
        """The Q-Former's cross-attention blocks (:attr:`qformer_cross_attention_layers`)."""
        return len(self.qformer_cross_attention_layers)

    @contextlib.contextmanager
    def token_grid(self, block: int = 2) -> Iterator[Callable[[Batch, int], TokenGrid]]:
        """The ``num_query_tokens`` LM tokens are learned queries, not patches: each reaches the
        ViT patch grid (the ``vit_patches`` view) through its cross-attention at Q-Former
        cross-attention block ``block`` (:meth:`record_query_patch_attention`: heads averaged,
        CLS column dropped), weights ``[Q, P]`` of the latest forward inside the block. ViCrop's
        two-stage map (arXiv 2502.17422; block 2 in the reference code)."""
        with self.record_query_patch_attention(block) as records:

            def locate(batch: Batch, b: int) -> TokenGrid:
                if not records:
                    raise RuntimeError("no Q-Former cross-attention was recorded: the model did not run")
                first = sum(len(sizes) for sizes in batch.image_sizes[:b])  # sample b's first image, flat
                return TokenGrid(batch.layouts[b][0].views[0], records[-1][first])  # [Q, P]

            yield locate

    # ------------------------------------------------------------------ Q-Former cross-attention
    def qformer_cross_attention_module(self, block: int) -> Any:
        """The cross-attention (``InstructBlipQFormerMultiHeadAttention``) of cross-attention
        block ``block``: an index into :attr:`qformer_cross_attention_layers` (negative counts
        from the end), so block 2 is Q-Former layer 4 of the released checkpoints."""
        layers = self.qformer_cross_attention_layers
        if isinstance(block, bool) or not isinstance(block, int) or not -len(layers) <= block < len(layers):
            raise MethodError(
                f"instructblip: Q-Former cross-attention block {block!r} does not exist; this model has "
                f"{len(layers)} cross-attention block(s) (Q-Former layers {list(layers)}), so choose a block "
                f"in 0..{len(layers) - 1} (e.g. --set vicrop.qformer_block={len(layers) - 1})"
            )
        return self.qformer.encoder.layer[layers[block]].crossattention.attention

    @contextlib.contextmanager
    def record_query_patch_attention(self, block: int) -> Iterator[list[torch.Tensor]]:
        """Record how the query tokens look at the ViT patches, during every forward inside the block.

        Yields a list; each forward of the model (or of :meth:`get_image_features`) appends the
        cross-attention probabilities of block ``block`` (see
        :meth:`qformer_cross_attention_module`), averaged over heads, with the CLS column dropped:
        ``[N_images, num_query_tokens, P]`` fp32, detached, ``P = rows * cols`` in row-major patch
        order (the ``vit_patches`` view). Row ``k`` belongs to image ``k`` of the batch (flat, in
        batch order). The probabilities are recomputed in fp32 from the module's own query/key
        projections (exactly what eager attention computes), so the attention implementation of
        the model is never changed. The hook is removed on exit, also after an exception.
        """
        import torch

        from ..attention import additive_mask

        module = self.qformer_cross_attention_module(block)
        prefix = self.num_vision_prefix_tokens
        records: list[torch.Tensor] = []

        def hook(mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)  # [N, Q, Dq]
            encoder = kwargs.get("encoder_hidden_states")  # [N, 1 + P, Dv]
            if encoder is None and len(args) > 2:
                encoder = args[2]
            if hidden is None or encoder is None:
                raise RuntimeError("instructblip: the Q-Former cross-attention was called without its inputs")
            mask = kwargs.get("encoder_attention_mask")
            with torch.no_grad():
                n, q_len, k_len, d = hidden.shape[0], hidden.shape[1], encoder.shape[1], mod.attention_head_size
                query = mod.query(hidden).view(n, q_len, -1, d).transpose(1, 2).float()  # [N, Hq, Q, d]
                key = mod.key(encoder).view(n, k_len, -1, d).transpose(1, 2).float()  # [N, Hq, 1 + P, d]
                logits = torch.matmul(query, key.transpose(-1, -2)) * mod.scaling  # [N, Hq, Q, 1 + P]
                if mask is not None:
                    logits = logits + additive_mask(mask, torch.float32)
                probs = torch.softmax(logits, dim=-1)  # [N, Hq, Q, 1 + P]
            records.append(probs.mean(dim=1)[:, :, prefix:].detach())  # [N, Q, P]

        handle = module.register_forward_hook(hook, with_kwargs=True)
        try:
            yield records
        finally:
            handle.remove()

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update({
            "num_query_tokens": self.num_query_tokens,
            "qformer_cross_attention_layers": list(self.qformer_cross_attention_layers),
            "patch_grid": list(self.patch_grid),
        })
        return info

    # ------------------------------------------------------------------ vision facet
    # BLIP ViT: [CLS] + patches, a fused ``qkv`` projection. The language model sees the Q-Former's
    # queries, not patches: an image's candidates are the ViT patches (``post_layernorm`` output,
    # what the Q-Former cross-attends to), and a subset of them is re-encoded by the Q-Former.

    #: ``get_image_features`` runs the Q-Former, which reads the instruction text
    image_feature_inputs = ("qformer_input_ids", "qformer_attention_mask")

    @property
    def outlier_vision_layer(self) -> int:
        """One below the layer the Q-Former reads, ``layers[-2]``: DAMRO's reference code for
        InstructBLIP hooks ``encoder.layers[-2]`` (the paper's "penultimate layer"), whereas the
        Q-Former reads the last layer."""
        return max(0, self.projector_vision_layer - 1)

    def vision_query_key(self, module: Any, hidden: torch.Tensor,
                         call_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """BLIP's fused ``qkv``: ``hidden`` [N, L, D] -> queries and keys ``[N, H, L, d]``."""
        heads = int(module.num_heads)
        n, length, _ = hidden.shape
        qkv = module.qkv(hidden).reshape(n, length, 3, heads, -1).permute(2, 0, 3, 1, 4)  # [3, N, H, L, d]
        return qkv[0], qkv[1]

    @property
    def vision_subset_source(self) -> Any:
        """The ViT: its ``last_hidden_state`` ``[N, 1 + P, Dv]`` is what the Q-Former reads."""
        return self.vision_tower

    @property
    def vision_subset_prefix(self) -> int:
        """The [CLS] before the patches."""
        return self.num_vision_prefix_tokens

    def encode_vision_subset(self, batch: Batch, tokens: Any) -> list[torch.Tensor]:
        """The Q-Former run over only the kept ViT tokens (``[k, Dv]`` per image), with the same
        queries and the same instruction text, then the language projection: still
        ``num_query_tokens`` tokens ``[Q, D]`` per image (DAMRO's negative image)."""
        import torch

        return list(self.query_features(batch, torch.stack(list(tokens))))  # N x [Q, D]

    def query_features(self, batch: Batch, vision_tokens: torch.Tensor) -> torch.Tensor:
        """The language-model tokens ``[N, Q, D]`` of the images of ``batch`` (flat) when the
        Q-Former cross-attends to ``vision_tokens`` ``[N, T, Dv]`` instead of the whole ViT output:
        steps 2 and 3 of the model's ``get_image_features`` (queries plus the instruction text,
        every vision token visible), without running the ViT again."""
        import torch

        device = vision_tokens.device
        n = vision_tokens.shape[0]
        qformer_ids = batch.inputs["qformer_input_ids"].to(device)  # [N, Lq]
        if qformer_ids.shape[0] != n:
            raise MethodError(f"instructblip: {n} images of vision tokens but {qformer_ids.shape[0]} Q-Former rows")
        text_mask = batch.inputs.get("qformer_attention_mask")
        if text_mask is None:
            text_mask = torch.ones_like(qformer_ids)
        query = self.query_tokens.expand(n, -1, -1)  # [N, Q, Dq]
        query_mask = torch.ones(query.shape[:-1], dtype=torch.long, device=device)  # [N, Q]
        out = self.qformer(
            input_ids=qformer_ids,
            attention_mask=torch.cat([query_mask, text_mask.to(device)], dim=1),  # [N, Q + Lq]
            query_embeds=query,
            encoder_hidden_states=vision_tokens,
            encoder_attention_mask=torch.ones(vision_tokens.shape[:-1], dtype=torch.long, device=device),  # [N, T]
            return_dict=True,
        )
        return self.projector(out.last_hidden_state[:, : query.shape[1]])  # [N, Q, D]

    @property
    def query_patch_blocks(self) -> int:
        """The Q-Former's cross-attention blocks (:meth:`record_query_patch_attention`)."""
        return len(self.qformer_cross_attention_layers)
