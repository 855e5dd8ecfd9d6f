"""innersight as an lmms-eval model: any lmms-eval task, with any of innersight's methods.

::

    lmms-eval --model innersight \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,methods=vicrop-rel-att+deco,deco.alpha=0.5 \\
        --tasks pope --batch_size 8 --log_samples --output_path runs/

Install (lmms-eval 0.7.3 declares torchvision and would replace a CPU torch with a CUDA build, so
it is installed without its dependencies, plus the few its model API needs)::

    pip install --no-deps lmms-eval==0.7.3 && pip install pytz loguru sqlitedict evaluate

The ``lmms-eval`` command line imports four more (none needs torch)::

    pip install sacrebleu tenacity pytablewriter "filelock<4"

lmms-eval finds this model through the entry point ``innersight`` of the ``lmms_eval.models``
group (:func:`innersight.integrations.lmms_eval_manifest`), as both model types: the chat type
(:class:`InnersightLMMSChat`, ``doc_to_messages`` requests), which lmms-eval resolves by default,
and the simple type (:class:`InnersightLMMS`, ``--force_simple``). From Python, an instance can be
passed directly: ``lmms_eval.evaluator.simple_evaluate(model=InnersightLMMS(pretrained=mllm,
methods="deco"), tasks=["pope"])``.

``--model_args`` (lmms-eval splits it on commas and each part on its first ``=``):

==========================  =================================================================
``pretrained=M``            hub id, local checkpoint or ``micro`` (required); from Python also
                            a loaded :class:`~innersight.MLLM`
``methods=A+B``             registered methods joined with ``+`` (``innersight list``), e.g.
                            ``methods=vicrop-rel-att+deco``; empty or absent: plain model
``METHOD.FIELD=VALUE``      a method config field, e.g. ``deco.alpha=0.5``, ``vicrop.layer=14``;
                            tuple fields separate items with ``;`` (``deco.layers=20;28``)
``set=METHOD.FIELD=VALUE``  the same, the CLI's ``--set`` spelling; several as
                            ``set=[deco.alpha=0.5,deco.top_k=10]`` (lmms-eval keeps brackets
                            together)
``template=chat``           ``chat`` (the model's own template) or ``reference`` (the papers')
``max_new_tokens=N``        answer length when a task's generation_kwargs give none (128)
``device=``, ``dtype=``     as ``innersight eval --device/--dtype`` (``--device`` of lmms-eval
                            is used when model_args give none)
``batch_size=N``            requests per batch (also lmms-eval's ``--batch_size``; not ``auto``)
==========================  =================================================================

Requests: ``generate_until`` arguments are ``(context, generation_kwargs, doc_to_visual,
doc_id, task, split)``; the visuals are ``doc_to_visual(self.task_dict[task][split][doc_id])``
(PIL images, or paths), all of one document's images go into its prompt (in order, before the
text; ``<image>`` markers in the context are dropped since the model's template places the
images). ``max_new_tokens``, ``temperature`` (> 0 samples at that temperature, else greedy),
``top_p`` (with sampling) and ``num_beams`` of the generation kwargs are honoured, the answer is
cut at the first ``until`` string, other keys are ignored. Requests with the same generation
settings are batched ``batch_size`` at a time; the answers equal those of
:meth:`innersight.MLLM.answer_batch` with the same methods. ``loglikelihood`` scores each
continuation after the formatted prompt (input and attention methods apply; decoding methods
act on generation and are refused there, as in ``innersight eval``'s likelihood protocol).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import MethodError, UserInputError
from ..methods import Plan, resolve_methods
from .lmms_samples import to_lmms_samples, write_lmms_samples

if TYPE_CHECKING:  # pragma: no cover
    from ..mllm import MLLM

_INSTALL = "pip install --no-deps lmms-eval==0.7.3 && pip install pytz loguru sqlitedict evaluate"

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError as _exc:  # pragma: no cover - exercised with lmms_eval hidden
    _missing = getattr(_exc, "name", None) or str(_exc)
    raise ImportError(
        f"innersight.integrations.lmms_eval needs lmms-eval, which cannot be imported ({_missing} is missing). "
        f"Install it without its dependencies so that your torch build is kept: {_INSTALL}"
    ) from _exc

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "InnersightLMMS", "InnersightLMMSChat", "ModelArgs", "generation_settings", "parse_model_args",
           "to_lmms_samples", "write_lmms_samples"]

#: answer length when a task's generation_kwargs name none
DEFAULT_MAX_NEW_TOKENS = 128

#: model_args this model accepts besides ``METHOD.FIELD`` keys (name -> meaning)
MODEL_ARGS: dict[str, str] = {
    "pretrained": "hub id, local checkpoint or 'micro' (required)",
    "methods": "methods joined with '+', e.g. vicrop-rel-att+deco",
    "set": "METHOD.FIELD=VALUE, or [M.F=V,M.F=V]",
    "template": "chat or reference",
    "max_new_tokens": f"answer length when a task gives none (default {DEFAULT_MAX_NEW_TOKENS})",
    "device": "cpu, cuda, cuda:N or auto",
    "dtype": "float32, float16 or bfloat16",
    "batch_size": "requests per batch",
    "max_batch_size": "accepted for lmms-eval's --max_batch_size, unused",
    "trust_remote_code": "passed to transformers when loading",
}

_FIELD_KEY = re.compile(r"^([A-Za-z0-9_-]+)\.([A-Za-z_][A-Za-z0-9_]*)$")
_IMAGE_MARKER = re.compile(r"<image>[ \t]*\n?")


@dataclass(frozen=True)
class ModelArgs:
    """The parsed ``--model_args`` of :class:`InnersightLMMS`."""

    pretrained: Any
    methods: tuple[str, ...] = ()
    settings: dict[str, dict[str, str]] = field(default_factory=dict)
    template: str = "chat"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    device: str | None = None
    dtype: str | None = None
    batch_size: int = 1
    trust_remote_code: bool = False


def _text(value: Any) -> str:
    """A model_args value back as text (lmms-eval turns ``0.5`` into a float, ``true`` into True)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _add_setting(settings: dict[str, dict[str, str]], key: str, value: Any, where: str) -> None:
    match = _FIELD_KEY.match(key.strip())
    if match is None:
        raise UserInputError(f"{where}: expected METHOD.FIELD=VALUE (e.g. deco.alpha=0.5), got {key!r}")
    method, name = match.groups()
    settings.setdefault(method, {})[name] = _text(value).strip()


def _parse_set(value: Any, settings: dict[str, dict[str, str]]) -> None:
    text = _text(value).strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UserInputError("model_args set= is empty; use set=METHOD.FIELD=VALUE, e.g. set=deco.alpha=0.5")
    for item in items:
        key, sep, val = item.partition("=")
        if not sep:
            raise UserInputError(f"model_args set={item!r}: expected METHOD.FIELD=VALUE, e.g. set=deco.alpha=0.5")
        _add_setting(settings, key, val, f"model_args set={item!r}")


def _positive_int(value: Any, name: str) -> int:
    text = _text(value).strip()
    if text.lower().startswith("auto"):
        raise UserInputError(f"{name}={text}: innersight does not size batches automatically; give a number")
    try:
        number = int(float(text))
    except ValueError:
        raise UserInputError(f"{name} must be a whole number, got {text!r}") from None
    if number < 1 or float(text) != number:
        raise UserInputError(f"{name} must be a whole number >= 1, got {text!r}")
    return number


def parse_model_args(args: Mapping[str, Any]) -> ModelArgs:
    """``--model_args`` (as lmms-eval hands them over: a dict of key -> parsed value) -> :class:`ModelArgs`.

    Raises:
        UserInputError: a missing ``pretrained``, an unknown key, a malformed ``set=`` or
            ``METHOD.FIELD`` entry, or a bad number. Method names and fields are checked by
            :func:`innersight.methods.resolve_methods` (``MethodError``).
    """
    settings: dict[str, dict[str, str]] = {}
    plain: dict[str, Any] = {}
    for key, value in args.items():
        if key == "set":
            _parse_set(value, settings)
        elif "." in key:
            _add_setting(settings, key, value, f"model_args {key}={_text(value)}")
        elif key in MODEL_ARGS:
            plain[key] = value
        else:
            known = ", ".join(MODEL_ARGS)
            raise UserInputError(f"unknown model_args key {key!r} for --model innersight; keys: {known}, or "
                                 f"METHOD.FIELD=VALUE for a method setting")
    pretrained = plain.get("pretrained")
    if pretrained is None or (isinstance(pretrained, str) and not pretrained.strip()):
        raise UserInputError("--model innersight needs pretrained=<hub id, local checkpoint or micro> in --model_args")
    methods_text = _text(plain.get("methods", "")).strip()
    methods = tuple(m.strip() for m in methods_text.split("+") if m.strip()) if methods_text else ()
    if methods_text and not methods:
        raise UserInputError(f"model_args methods={methods_text!r} names no method; join names with '+'")
    template = _text(plain.get("template", "chat")).strip()
    if template not in ("chat", "reference"):
        raise UserInputError(f"model_args template must be chat or reference, not {template!r}")
    trust = _text(plain.get("trust_remote_code", "false")).strip().lower()
    if trust not in ("true", "false", "1", "0"):
        raise UserInputError(f"model_args trust_remote_code must be true or false, not {trust!r}")
    device = plain.get("device")
    dtype = plain.get("dtype")
    return ModelArgs(
        pretrained=pretrained.strip() if isinstance(pretrained, str) else pretrained,
        methods=methods,
        settings=settings,
        template=template,
        max_new_tokens=_positive_int(plain.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS), "max_new_tokens"),
        device=_text(device).strip() if device is not None else None,
        dtype=_text(dtype).strip() if dtype is not None else None,
        batch_size=_positive_int(plain.get("batch_size", 1), "batch_size"),
        trust_remote_code=trust in ("true", "1"),
    )


def generation_settings(gen_kwargs: Mapping[str, Any] | None, default_max_new_tokens: int) -> tuple[dict[str, Any], list[str]]:
    """``(generation kwargs for innersight, stop strings)`` of a task's generation_kwargs.

    ``temperature > 0`` samples at that temperature (with ``top_p`` when it is in (0, 1)); anything
    else is greedy, whatever ``do_sample`` says (lmms-eval's convention). ``num_beams > 1`` is
    passed on; ``until`` becomes the stop strings; other keys are ignored.
    """
    kwargs = dict(gen_kwargs or {})
    until = kwargs.get("until")
    if until is None:
        stops: list[str] = []
    elif isinstance(until, str):
        stops = [until]
    elif isinstance(until, (list, tuple)):
        stops = [str(u) for u in until]
    else:
        raise UserInputError(f"generation_kwargs until must be a string or a list, not {type(until).__name__}")
    out: dict[str, Any] = {"max_new_tokens": _positive_int(kwargs.get("max_new_tokens", default_max_new_tokens),
                                                           "max_new_tokens")}
    temperature = float(kwargs.get("temperature") or 0.0)
    if temperature > 0:
        out["do_sample"] = True
        out["temperature"] = temperature
        top_p = kwargs.get("top_p")
        if top_p is not None and 0 < float(top_p) < 1:
            out["top_p"] = float(top_p)
    beams = int(kwargs.get("num_beams") or 1)
    if beams > 1:
        out["num_beams"] = beams
    return out, stops


def cut_at_stops(text: str, stops: Iterable[str]) -> str:
    """``text`` up to the first occurrence of any non-empty stop string."""
    end = len(text)
    for stop in stops:
        if stop:
            at = text.find(stop)
            if at != -1:
                end = min(end, at)
    return text[:end]


def clean_context(context: str) -> str:
    """The task's context without ``<image>`` markers (the model's template places the images)."""
    cleaned = _IMAGE_MARKER.sub("", context).strip()
    return cleaned or context


def _progress(total: int, disable: bool, desc: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return contextlib.nullcontext(type("NoBar", (), {"update": lambda self, n=1: None})())
    return tqdm(total=total, disable=disable, desc=desc)


class InnersightLMMS(lmms):
    """An lmms-eval ``lmms`` model that answers through an innersight :class:`~innersight.MLLM`
    with a fixed set of methods (see the module docstring for ``--model_args``)."""

    is_simple = True

    def __init__(self, pretrained: Any = None, **model_args: Any) -> None:
        super().__init__()
        args = parse_model_args({"pretrained": pretrained, **model_args})
        self.args = args
        self.plan: Plan = resolve_methods(list(args.methods), args.settings)  # names checked before loading
        from ..eval.runner import process_info

        process = process_info(args.device)
        self._rank, self._world_size = process.rank, process.world_size
        if isinstance(args.pretrained, str):
            import innersight

            self.mllm = innersight.load(args.pretrained, device=args.device or process.device, dtype=args.dtype,
                                        trust_remote_code=args.trust_remote_code)
        elif hasattr(args.pretrained, "adapter") and hasattr(args.pretrained, "model"):
            self.mllm = args.pretrained
        else:
            raise UserInputError(f"pretrained must be a model name or path, or a loaded innersight MLLM, "
                                 f"not {type(args.pretrained).__name__}")
        self.template = args.template
        self.batch_size_per_gpu = args.batch_size

    # ------------------------------------------------------------------ properties lmms-eval reads
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> Any:
        return self.mllm.adapter.device

    @property
    def model(self) -> Any:
        return self.mllm.model

    @property
    def tokenizer(self) -> Any:
        return self.mllm.adapter.tokenizer

    @property
    def methods(self) -> tuple[str, ...]:
        """The names of the methods every answer goes through."""
        return self.plan.names

    # ------------------------------------------------------------------ request plumbing
    def _visuals(self, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> list[Any]:
        """The images of one request's document, in prompt order."""
        try:
            doc = self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError) as exc:
            raise UserInputError(f"lmms-eval gave no document {doc_id!r} of {task}/{split} in task_dict") from exc
        visuals = doc_to_visual(doc) if callable(doc_to_visual) else doc_to_visual
        if visuals is None:
            visuals = []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        flat = [v for item in visuals for v in (item if isinstance(item, (list, tuple)) else [item])]
        if not flat:
            raise UserInputError(f"{task} document {doc_id!r} has no image; innersight's methods act on images "
                                 f"(text-only tasks are not supported)")
        return flat

    def _groups(self, requests: Sequence[Instance], kwargs_at: int = 1) -> Iterator[list[int]]:
        """Request indices grouped by generation settings (``args[kwargs_at]``; order kept), in batches."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            gen_kwargs = request.args[kwargs_at]
            key = json.dumps(gen_kwargs, sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size_per_gpu):
                yield indices[start : start + self.batch_size_per_gpu]

    # ------------------------------------------------------------------ the lmms API
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers for ``generate_until`` requests, in request order."""
        results: list[str | None] = [None] * len(requests)
        with _progress(len(requests), self.rank != 0, "innersight responding") as bar:
            for indices in self._groups(requests):
                batch = [requests[i].args for i in indices]
                contexts = [clean_context(str(args[0])) for args in batch]
                images = [self._visuals(args[2], args[3], args[4], args[5]) for args in batch]
                generation, stops = generation_settings(batch[0][1], self.args.max_new_tokens)
                answers = self.plan.run(self.mllm, images, contexts, template=self.template, **generation)
                for i, args, answer in zip(indices, batch, answers):
                    text = cut_at_stops(answer.text, stops)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", (args[0], args[1]), text)
                bar.update(len(indices))
        return [r if r is not None else "" for r in results]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(log-probability of the continuation, whether greedy decoding would produce it)`` for
        each ``loglikelihood`` request; requests on the same document and context share a batch."""
        if self.plan.at("decoding"):
            names = ", ".join(s.name for s in self.plan.specs if s.point == "decoding")
            raise MethodError(f"loglikelihood scores continuations in one forward pass; decoding methods ({names}) "
                              f"act on generation -- run generate_until tasks with them")
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, request in enumerate(requests):
            context, _, _, doc_id, task, split = request.args
            groups.setdefault((str(context), task, split, doc_id), []).append(i)
        with _progress(len(requests), self.rank != 0, "innersight scoring") as bar:
            for (context, task, split, doc_id), indices in groups.items():
                doc_to_visual = requests[indices[0]].args[2]
                images = self._visuals(doc_to_visual, doc_id, task, split)
                continuations = []
                for i in indices:
                    target = requests[i].args[1]
                    doc = self.task_dict[task][split][doc_id]
                    continuations.append(str(target(doc) if callable(target) else target))
                scored = continuation_logprobs(self.mllm, self.plan, images, clean_context(context), continuations,
                                               self.template)
                for i, result in zip(indices, scored):
                    results[i] = result
                    self.cache_hook.add_partial("loglikelihood", requests[i].args[:2], result)
                bar.update(len(indices))
        return [r if r is not None else (0.0, False) for r in results]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """Not supported: multi-round tasks feed answers back as new turns, which innersight's
        single-turn methods do not define."""
        raise NotImplementedError("innersight answers single-turn questions; multi-round lmms-eval tasks "
                                  "(generate_until_multi_round) are not supported")


class InnersightLMMSChat(InnersightLMMS):
    """The same model as lmms-eval's *chat* model type (``is_simple = False``), which lmms-eval
    0.7.3 resolves for ``--model innersight`` by default (``--force_simple`` picks
    :class:`InnersightLMMS`). Chat requests carry ``(context, doc_to_messages, generation_kwargs,
    doc_id, task, split)``; the messages of one document must be one user turn (optionally after
    a system turn, whose text is put before the question) holding its images and text."""

    is_simple = False

    def _chat_turn(self, doc_to_messages: Any, doc_id: Any, task: str, split: str) -> tuple[list[Any], str]:
        """``(images, text)`` of one chat request's document."""
        from lmms_eval.protocol import ChatMessages

        try:
            doc = self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError) as exc:
            raise UserInputError(f"lmms-eval gave no document {doc_id!r} of {task}/{split} in task_dict") from exc
        raw = doc_to_messages(doc) if callable(doc_to_messages) else doc_to_messages
        messages = ChatMessages(messages=raw).messages
        users = [m for m in messages if m.role == "user"]
        if len(users) != 1 or any(m.role == "assistant" for m in messages):
            raise UserInputError(f"{task} document {doc_id!r}: innersight answers one user turn, got "
                                 f"{len(users)} user and {sum(m.role == 'assistant' for m in messages)} assistant turns")
        images: list[Any] = []
        texts: list[str] = []
        for message in messages:
            for content in message.content:
                if content.type == "image":
                    images.append(content.url)
                elif content.type == "text" and content.text.strip():
                    texts.append(content.text.strip())
                elif content.type in ("video", "audio"):
                    raise UserInputError(f"{task} document {doc_id!r} has {content.type}; innersight answers about images")
        if not images:
            raise UserInputError(f"{task} document {doc_id!r} has no image; innersight's methods act on images "
                                 f"(text-only tasks are not supported)")
        return images, clean_context("\n".join(texts))

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers for chat ``generate_until`` requests, in request order."""
        results: list[str | None] = [None] * len(requests)
        with _progress(len(requests), self.rank != 0, "innersight responding") as bar:
            for indices in self._groups(requests, kwargs_at=2):
                batch = [requests[i].args for i in indices]
                turns = [self._chat_turn(args[1], args[3], args[4], args[5]) for args in batch]
                generation, stops = generation_settings(batch[0][2], self.args.max_new_tokens)
                answers = self.plan.run(self.mllm, [images for images, _ in turns], [text for _, text in turns],
                                        template=self.template, **generation)
                for i, args, answer in zip(indices, batch, answers):
                    text = cut_at_stops(answer.text, stops)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", (args[0], args[2]), text)
                bar.update(len(indices))
        return [r if r is not None else "" for r in results]


def continuation_logprobs(mllm: MLLM, plan: Plan, images: Sequence[Any], context: str, continuations: Sequence[str],
                          template: str = "chat") -> list[tuple[float, bool]]:
    """For each continuation: ``(sum of its token log-probabilities after the formatted prompt,
    whether each of its tokens is the greedy choice)``. Input methods change the images first,
    attention methods are active during the one batched forward pass."""
    import torch

    from ..flow import activate_attention, apply_input, load_image_lists

    image_lists, _ = apply_input(plan, mllm, load_image_lists([list(images)]), [context], template)
    pictures = image_lists[0]
    adapter = mllm.adapter
    prompt = adapter.format_prompt(context, len(pictures), template)
    n_prompt = int(adapter.prepare([pictures], [prompt]).inputs["attention_mask"][0].sum())
    batch = adapter.prepare([pictures] * len(continuations), [prompt + c for c in continuations])
    with contextlib.ExitStack() as stack:
        activate_attention(stack, plan, mllm, batch)
        with torch.inference_mode():
            logits = mllm.model(**batch.inputs).logits  # [C, L, V]
    mask = batch.inputs["attention_mask"]  # [C, L]
    out: list[tuple[float, bool]] = []
    for i, continuation in enumerate(continuations):
        positions = torch.nonzero(mask[i], as_tuple=False).squeeze(1)  # [T_i] real tokens
        k = int(positions.numel()) - n_prompt
        if k < 1:
            if continuation.strip():
                raise UserInputError(f"continuation {continuation!r} adds no tokens to the prompt")
            out.append((0.0, True))
            continue
        targets = batch.input_ids[i, positions[-k:]]  # [k]
        log_probs = torch.log_softmax(logits[i, positions[-k - 1 : -1]].float(), dim=-1)  # [k, V]
        total = float(log_probs.gather(1, targets[:, None]).sum())
        greedy = bool((log_probs.argmax(dim=-1) == targets).all())
        out.append((total, greedy))
    return out
