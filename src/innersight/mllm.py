"""The user-facing handle: a loaded model, its processor and its adapter."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .adapters.base import Adapter, Batch
from .errors import UserInputError
from .flow import Answer, ImageLike, build_batch, check_questions, load_image_lists

__all__ = ["MLLM", "Answer", "ImageLike", "load_image_lists", "DEFAULT_MAX_NEW_TOKENS"]

DEFAULT_MAX_NEW_TOKENS = 32


class MLLM:
    """A multimodal LLM with its processor and adapter. Build it with :func:`innersight.load`."""

    def __init__(self, model: Any, processor: Any, adapter: Adapter, name: str = ""):
        self.model = model
        self.processor = processor
        self.adapter = adapter
        self.name = name or getattr(model.config, "_name_or_path", "")

    def __repr__(self) -> str:
        return f"MLLM({self.name!r}, family={self.adapter.family!r})"

    # ------------------------------------------------------------------ inputs
    def prepare(
        self,
        images: Sequence[ImageLike | Sequence[ImageLike]],
        questions: Sequence[str],
        *,
        template: str = "chat",
    ) -> Batch:
        """Load images, format prompts and tokenise a left-padded batch."""
        check_questions(images, questions)
        return build_batch(self.adapter, load_image_lists(images), questions, template)

    # ------------------------------------------------------------------ generation
    def generation_kwargs(self, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, **overrides: Any) -> dict[str, Any]:
        """Greedy decoding with the model's pad/eos ids unless overridden."""
        if max_new_tokens < 1:
            raise UserInputError("max_new_tokens must be at least 1")
        tok = self.adapter.tokenizer
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False}
        if tok is not None and tok.pad_token_id is not None:
            kwargs["pad_token_id"] = tok.pad_token_id
        kwargs.update(overrides)
        if not kwargs.get("do_sample"):
            for key in ("temperature", "top_p", "top_k"):
                kwargs.setdefault(key, None)
        return kwargs

    def generate(self, batch: Batch, **generation: Any) -> list[list[int]]:
        """Token ids generated for each sample of ``batch`` (prompt removed, padding kept out)."""
        import torch

        kwargs = self.generation_kwargs(**generation)
        with torch.inference_mode():
            out = self.model.generate(**batch.inputs, **kwargs)  # [B, L + new]
        new = out[:, batch.input_ids.shape[1]:]
        tok = self.adapter.tokenizer
        stop = {tok.pad_token_id, tok.eos_token_id} if tok is not None else set()
        result = []
        for row in new.tolist():
            ids = []
            for t in row:
                if t in stop:
                    break
                ids.append(t)
            result.append(ids)
        return result

    def decode(self, ids: list[int]) -> str:
        return self.adapter.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # ------------------------------------------------------------------ answering
    def answer(
        self,
        image: ImageLike | Sequence[ImageLike],
        question: str,
        *,
        methods: Iterable[str] = (),
        settings: dict[str, dict[str, Any]] | None = None,
        template: str = "chat",
        **generation: Any,
    ) -> Answer:
        """Answer one question about one image (or a list of images in one prompt)."""
        return self.answer_batch([image], [question], methods=methods, settings=settings, template=template,
                                 **generation)[0]

    def answer_batch(
        self,
        images: Sequence[ImageLike | Sequence[ImageLike]],
        questions: Sequence[str],
        *,
        methods: Iterable[str] = (),
        settings: dict[str, dict[str, Any]] | None = None,
        template: str = "chat",
        batch_size: int = 8,
        **generation: Any,
    ) -> list[Answer]:
        """Answer many questions, ``batch_size`` at a time (left padding; same answers as one by one).

        ``methods`` are registered method names (``innersight list``); ``settings`` overrides
        their config fields by method name, e.g. ``{"vicrop-rel-att": {"layer": 10}}`` (the key
        ``vicrop`` shared by the ViCrop variants works too; ``innersight list`` shows both).
        Each chunk runs :meth:`innersight.flow.Plan.run` (the flow of one answer).
        """
        from .methods import resolve_methods

        plan = resolve_methods(methods, settings)
        if batch_size < 1:
            raise UserInputError("batch_size must be at least 1")
        answers: list[Answer] = []
        for start in range(0, len(questions), batch_size):
            chunk_images = images[start : start + batch_size]
            chunk_questions = questions[start : start + batch_size]
            answers.extend(plan.run(self, chunk_images, chunk_questions, template=template, **generation))
        return answers
