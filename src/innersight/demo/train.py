"""Train the micro model on the procedural world (CPU, minutes, reproducible from a seed).

    python -m innersight.demo.train --out DIR --minutes 60 --threads 2 --seed 0

Each step draws a fresh batch from :class:`~innersight.demo.world.World` as a pure function of
``(seed, step)`` — a mixture of all question families, the generic description prompt and (in
a fraction of the steps) two-image samples whose second image is a crop — and takes one AdamW
step on the answer tokens (each sample's mean token loss, averaged over the batch, so long
descriptions do not drown the one-word answers) plus, by default, an auxiliary per-patch loss: a
linear probe on the image tokens predicts colour / kind / symbol of the object each patch shows
(:func:`aux_loss`; training only, never saved; ``--aux-weight 0`` turns it off). The prompt is
never a target. The learning rate warms up linearly and decays
along a cosine. A fixed held-out set is evaluated periodically and accuracy is printed by family
and by size class. A checkpoint is written every few minutes; rerunning the same command resumes
from it. At the end the model is saved with :func:`innersight.demo.micro.save`, reloaded from
disk, evaluated once more, and ``training.json`` records steps, time, seed, command and metrics.

With ``--minutes`` the number of steps is fixed after timing the first steps (so the cosine ends
on time); ``--steps`` fixes it outright, which makes two runs with the same seed and thread
count identical.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from . import micro
from .pretrain_vision import CELL_COLOURS
from .world import (
    GLYPH_KINDS,
    SHAPES,
    SIZE_CLASSES,
    SYMBOLS,
    Sample,
    World,
    WorldConfig,
    cell_objects,
    image_regions,
    parse_description,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: the held-out evaluation stream (never a training seed's stream: those end in 0 or 1)
EVAL_SEED = 2_147_483_629

#: classes of the auxiliary per-patch targets (index 0: background)
AUX_COLOURS: tuple[str, ...] = CELL_COLOURS
AUX_KINDS: tuple[str, ...] = ("none", *SHAPES, *GLYPH_KINDS)
AUX_SYMBOLS: tuple[str, ...] = ("none", *SYMBOLS)
AUX_SIZES: tuple[int, int, int] = (len(AUX_COLOURS), len(AUX_KINDS), len(AUX_SYMBOLS))


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (the defaults are the ones the bundled model was trained with)."""

    seed: int = 0
    batch_size: int = 48
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 150
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    #: fraction of the steps whose batch is all two-image (full scene + crop) samples
    two_image_frac: float = 0.25
    #: weight of the auxiliary per-patch loss (0 disables it); see :func:`aux_loss`
    aux_weight: float = 0.5
    eval_n: int = 48
    crop_side: int = 64
    #: stage 1 (:mod:`innersight.demo.pretrain_vision`): steps, batch and peak learning rate of
    #: the vision tower's own training before the whole model trains (0 skips the stage)
    vision_steps: int = 1500
    vision_batch_size: int = 64
    vision_lr: float = 2e-3
    #: stage 2's learning rate of the (stage-1 trained) vision tower, relative to ``lr``
    vision_lr_scale: float = 0.3
    model: micro.MicroConfig = field(default_factory=micro.MicroConfig)


# -------------------------------------------------------------------------------------- batching
class Encoder:
    """Turns :class:`Sample` lists into model inputs, caching token ids of prompts and answers."""

    def __init__(self, processor: Any, image_tokens: int, *, patch_grid: int | None = None):
        self.processor = processor
        self.patch_grid = patch_grid
        self.tok = processor.tokenizer
        self.image_tokens = image_tokens
        self.image_id = int(self.tok.convert_tokens_to_ids(micro.IMAGE_TOKEN))
        self.pad_id = int(self.tok.pad_token_id)
        self.eos_id = int(self.tok.eos_token_id)
        self._prompts: dict[tuple[str, int], list[int]] = {}
        self._answers: dict[str, list[int]] = {}

    def prompt_ids(self, question: str, num_images: int) -> list[int]:
        """Token ids of the generation prompt, image placeholders expanded as the processor does."""
        key = (question, num_images)
        if key not in self._prompts:
            ids = self.tok(micro.prompt(question, num_images)).input_ids
            out: list[int] = []
            for i in ids:
                out.extend([self.image_id] * self.image_tokens if i == self.image_id else [i])
            self._prompts[key] = out
        return self._prompts[key]

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of ``answer`` followed by ``</s>``."""
        if answer not in self._answers:
            self._answers[answer] = [*self.tok(answer, add_special_tokens=False).input_ids, self.eos_id]
        return self._answers[answer]

    def __call__(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids`` [B, L], ``attention_mask`` [B, L], ``labels`` [B, L] (-100
        except on answer tokens) and ``pixel_values`` [N_images, 3, S, S]; with ``patch_grid``
        also ``patch_labels`` [N_images, grid*grid, 3] (see :func:`patch_labels`)."""
        import torch

        rows = []
        for s in samples:
            p = self.prompt_ids(s.question, len(s.images))
            a = self.answer_ids(s.answer)
            rows.append((p + a, [-100] * len(p) + a))
        length = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)  # [B, L]
        labels = torch.full((len(rows), length), -100, dtype=torch.long)  # [B, L]
        mask = torch.zeros((len(rows), length), dtype=torch.long)  # [B, L]
        for b, (x, y) in enumerate(rows):
            ids[b, : len(x)] = torch.tensor(x)
            labels[b, : len(y)] = torch.tensor(y)
            mask[b, : len(x)] = 1
        images = [im for s in samples for im in s.images]
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels,
               "pixel_values": micro.pixel_values(images, self.processor)}
        if self.patch_grid is not None:
            out["patch_labels"] = patch_labels(samples, self.patch_grid)
        return out


def patch_labels(samples: Sequence[Sample], grid: int) -> torch.Tensor:
    """Per image, per image token: (colour, kind, symbol) class ids of the object that the
    token's patch shows (0 = background / no symbol): [N_images, grid*grid, 3] long.

    The first image of a sample shows the whole canvas, a second one ``meta['crop_box']``.
    """
    import torch

    rows: list[list[tuple[int, int, int]]] = []
    for s in samples:
        scene = s.meta["scene"]
        for region in image_regions(s):
            cells = []
            for obj in cell_objects(scene, region, grid):
                if obj is None:
                    cells.append((0, 0, 0))
                else:
                    symbol = AUX_SYMBOLS.index(obj.symbol) if obj.symbol is not None else 0
                    cells.append((AUX_COLOURS.index(obj.colour), AUX_KINDS.index(obj.kind), symbol))
            rows.append(cells)
    return torch.tensor(rows, dtype=torch.long)  # [N_images, grid*grid, 3]


def make_aux_head(model: Any) -> torch.nn.Linear:
    """A linear probe from the projected image tokens to the patch classes (training only: it is
    not part of the saved model)."""
    import torch

    hidden = int(model.config.get_text_config().hidden_size)
    return torch.nn.Linear(hidden, sum(AUX_SIZES))


def aux_loss(head: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the three patch classifications.

    ``features``: the projector's output, the image tokens as the language model receives them
    [N_images, T, H]; ``labels``: [N_images, T, 3]. Dense per-patch supervision makes the vision
    tower learn colours, shapes and glyphs far sooner than the answer tokens alone would; the
    head is thrown away after training.
    """
    import torch.nn.functional as F

    logits = head(features)  # [N, T, C]
    loss = features.new_zeros(())
    start = 0
    for k, size in enumerate(AUX_SIZES):
        part = logits[..., start : start + size]  # [N, T, size]
        loss = loss + F.cross_entropy(part.reshape(-1, size).float(), labels[..., k].reshape(-1))
        start += size
    return loss / len(AUX_SIZES)


def sample_losses(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample mean answer-token loss [B], the shifted targets [B, L-1] and the argmax
    predictions [B, L-1]."""
    import torch.nn.functional as F

    device = model.get_input_embeddings().weight.device
    batch = {k: v.to(device) for k, v in batch.items()}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"])
    logits = out.logits[:, :-1].float()  # [B, L-1, V]
    targets = batch["labels"][:, 1:]  # [B, L-1]
    ce = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")  # [B, L-1]
    on = targets != -100  # [B, L-1]
    per_sample = (ce * on).sum(1) / on.sum(1).clamp(min=1)  # [B]
    return per_sample, targets, logits.argmax(-1)


def warmup_cosine(step: int, total: int, peak: float, warmup: int, floor_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps to ``peak``, then cosine decay to ``peak * floor_ratio``
    at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = peak * floor_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Stage 2's schedule: warm-up (``cfg.warmup_steps``, at most a tenth of the run) to
    ``cfg.lr``, then cosine decay to ``cfg.lr * cfg.min_lr_ratio``."""
    return warmup_cosine(step, total, cfg.lr, min(cfg.warmup_steps, max(1, total // 10)), cfg.min_lr_ratio)


def make_optimizer(model: Any, cfg: TrainConfig, extra: Any = None) -> torch.optim.Optimizer:
    """AdamW over ``model`` (and the ``extra`` module, e.g. the auxiliary head); weight decay on
    matrices only (not on norms, biases, embeddings)."""
    import itertools

    import torch

    # [vision tower?][decay?] -> parameters; the tower trained in stage 1 moves at vision_lr_scale
    buckets: dict[tuple[bool, bool], list[Any]] = {(v, d): [] for v in (False, True) for d in (True, False)}
    named = itertools.chain(model.named_parameters(), extra.named_parameters() if extra is not None else ())
    for name, p in named:
        if not p.requires_grad:
            continue
        tower = "vision_tower" in name and cfg.vision_steps > 0
        buckets[(tower, p.ndim >= 2 and "embedding" not in name)].append(p)
    groups = [{"params": ps, "weight_decay": cfg.weight_decay if d else 0.0,
               "lr_scale": cfg.vision_lr_scale if v else 1.0} for (v, d), ps in buckets.items() if ps]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def train_step(
    model: Any,
    optimizer: Any,
    batch: dict[str, torch.Tensor],
    lr: float,
    grad_clip: float,
    aux_head: torch.nn.Linear | None = None,
    aux_weight: float = 0.0,
) -> float:
    """One optimisation step; returns the answer-token loss of the batch before the update.

    With ``aux_head`` and ``batch['patch_labels']`` the auxiliary patch loss (times
    ``aux_weight``) is added to the objective.
    """
    import torch

    model.train()
    batch = {k: v.to(model.get_input_embeddings().weight.device) for k, v in batch.items()}
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    captured: list[torch.Tensor] = []
    use_aux = aux_head is not None and aux_weight > 0 and "patch_labels" in batch
    handle = (model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: captured.append(out))
              if use_aux else None)
    try:
        per_sample, _, _ = sample_losses(model, batch)
    finally:
        if handle is not None:
            handle.remove()
    answer_loss = per_sample.mean()
    loss = answer_loss
    if use_aux:
        assert aux_head is not None
        loss = loss + aux_weight * aux_loss(aux_head, captured[0], batch["patch_labels"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return float(answer_loss.detach())


# -------------------------------------------------------------------------------------- evaluation
class EvalSuite:
    """A fixed held-out set, encoded once, and the metrics the training log prints.

    * ``read/<size>``: single-image symbol reading accuracy (greedy exact match);
    * ``read+crop/<size>``: the same questions with an oracle crop (``crop_side`` px square
      centred on the target) as a second image — what ViCrop at its best could give;
    * ``colour/<size>``, ``exist`` (balanced yes/no), ``halluc`` (rate of "yes" about the absent
      co-occurrence partner; lower is better), ``generic`` and ``describe`` (greedy exact match
      under teacher forcing), ``describe/recall`` and ``describe/chair_i`` (generated
      descriptions: fraction of objects named, fraction of named objects that are not there).

    Greedy exact match is measured by teacher forcing: greedy decoding reproduces the answer
    exactly iff the argmax at every answer position (including ``</s>``) is the answer token.
    """

    def __init__(self, world: World, encoder: Encoder, n: int, crop_side: int, seed: int = EVAL_SEED,
                 describe_n: int | None = None):
        self.encoder = encoder
        self.sets: dict[str, list[Sample]] = {}
        for size in SIZE_CLASSES:
            self.sets[f"read/{size}"] = world.eval_samples("read", n, seed, size_class=size)
            self.sets[f"read+crop/{size}"] = world.eval_samples("read", n, seed, size_class=size, crop_side=crop_side)
            self.sets[f"colour/{size}"] = world.eval_samples("colour", n, seed, size_class=size)
        self.sets["exist"] = world.eval_samples("exist", 2 * n, seed)
        self.sets["halluc"] = world.hallucination_samples(n, seed)
        self.sets["generic"] = world.eval_samples("generic", max(8, n // 2), seed)
        self.sets["describe"] = world.eval_samples("describe", max(8, n // 2), seed)
        self.describe_n = describe_n if describe_n is not None else max(8, n // 2)
        self._cache: dict[tuple[str, int], list[dict[str, torch.Tensor]]] = {}
        yes_ids = encoder.tok("yes", add_special_tokens=False).input_ids
        self.yes_id = int(yes_ids[0])

    def __call__(self, model: Any, batch_size: int = 64) -> dict[str, float]:
        import torch

        model.eval()
        metrics: dict[str, float] = {}
        with torch.no_grad():
            for name in self.sets:
                exact: list[bool] = []
                first: list[int] = []
                for batch in self._encoded(name, batch_size):
                    _, targets, preds = sample_losses(model, batch)
                    on = targets != -100  # [B, L-1]
                    exact += ((preds == targets) | ~on).all(1).tolist()
                    first_pos = on.float().argmax(1)  # [B] first answer position
                    first += preds.gather(1, first_pos[:, None]).squeeze(1).tolist()
                if name == "halluc":
                    metrics[name] = float(np.mean([f == self.yes_id for f in first]))
                else:
                    metrics[name] = float(np.mean(exact))
            metrics.update(self._describe(model))
        return metrics

    def _encoded(self, name: str, batch_size: int) -> list[dict[str, torch.Tensor]]:
        key = (name, batch_size)
        if key not in self._cache:
            samples = self.sets[name]
            self._cache[key] = [self.encoder(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
        return self._cache[key]

    def _describe(self, model: Any) -> dict[str, float]:
        samples = self.sets["describe"][: self.describe_n]
        texts = generate(model, self.encoder.processor, samples, max_new_tokens=48)
        named = hallucinated = recalled = total = 0
        for s, text in zip(samples, texts, strict=True):
            truth = {(o.colour, o.kind, o.symbol.lower() if o.symbol else None) for o in s.meta["scene"].objects}
            said = parse_description(text)
            named += len(said)
            hallucinated += sum(1 for t in said if t not in truth)
            recalled += len(truth & set(said))
            total += len(truth)
        return {"describe/recall": recalled / max(total, 1), "describe/chair_i": hallucinated / max(named, 1)}


def generate(model: Any, processor: Any, samples: Sequence[Sample], max_new_tokens: int = 48) -> list[str]:
    """Greedy answers of ``model`` to ``samples`` (batched, left-padded through the processor)."""
    import torch

    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        inputs = processor(text=[micro.prompt(s.question, len(s.images)) for s in samples],
                           images=[im for s in samples for im in s.images], return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    inputs = inputs.to(model.get_input_embeddings().weight.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]  # [B, T]
    return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]


def format_metrics(metrics: dict[str, float]) -> str:
    """A compact multi-line table: families by size, then the rest."""
    lines = ["            " + " ".join(f"{s:>7}" for s in SIZE_CLASSES)]
    for fam in ("read", "read+crop", "colour"):
        lines.append(f"  {fam:<10}" + " ".join(f"{metrics.get(f'{fam}/{s}', float('nan')):7.3f}" for s in SIZE_CLASSES))
    rest = [k for k in metrics if "/" not in k or k.startswith("describe/")]
    lines.append("  " + "  ".join(f"{k}={metrics[k]:.3f}" for k in rest))
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- the run
def _atomic_save(obj: Any, path: Path) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


#: offset of the stage-1 batch stream (kept apart from stage 2's ``(seed, step)`` batches)
VISION_STREAM = 1_000_003


def pretrain_vision_stage(model: Any, processor: Any, world: World, cfg: TrainConfig, out: Path, *, device: str,
                          ckpt_minutes: float, log_every: int, stop_after: int | None) -> tuple[int, bool]:
    """Stage 1: train the vision tower alone (see :mod:`innersight.demo.pretrain_vision`), resuming
    from ``out/vision.pt``. Returns ``(steps taken in this session, finished)``; once finished the
    tower's weights are in ``model`` and in ``vision.pt``."""
    import torch

    from . import pretrain_vision as pv

    path = out / "vision.pt"
    world = World(replace(world.config, **pv.CROP_MIX))
    tower = model.model.vision_tower
    heads = pv.make_heads(int(model.config.vision_config.hidden_size)).to(device)
    params = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.vision_lr, betas=cfg.betas, weight_decay=0.01)
    step, history, base_elapsed = 0, [], 0.0
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["seed"] != cfg.seed:
            raise SystemExit(f"{path} belongs to seed {state['seed']}, not {cfg.seed}; use another --out")
        tower.load_state_dict(state["tower"])
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        step, history, base_elapsed = state["step"], state["history"], state["elapsed"]
        if step >= cfg.vision_steps:
            return 0, True
        print(f"stage 1 resumed from {path} at step {step}", flush=True)
    grid = cfg.model.image_size // cfg.model.patch_size
    held_out = world.batch(EVAL_SEED, 0, 96, two_image=True)
    held_pixels = micro.pixel_values([im for s in held_out for im in s.images], processor).to(device)
    held_targets = pv.object_targets(held_out, grid)

    t0 = time.time()

    def save() -> None:
        _atomic_save({"tower": tower.state_dict(), "heads": heads.state_dict(), "optimizer": optimizer.state_dict(),
                      "step": step, "history": history, "seed": cfg.seed,
                      "elapsed": base_elapsed + time.time() - t0}, path)

    print(f"stage 1: vision tower alone, {cfg.vision_steps} steps of {cfg.vision_batch_size} scenes", flush=True)
    session, losses, last_ckpt = 0, [], time.time()
    tower.train()
    while step < cfg.vision_steps:
        if stop_after is not None and session >= stop_after:
            save()
            return session, False
        samples = world.batch(cfg.seed + VISION_STREAM, step, cfg.vision_batch_size, two_image=step % 2 == 1)
        pixels = micro.pixel_values([im for s in samples for im in s.images], processor).to(device)
        targets = pv.object_targets(samples, grid)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, cfg.vision_steps, cfg.vision_lr, pv.WARMUP_STEPS, cfg.min_lr_ratio)
        loss = pv.vision_loss(heads, pv.encoder_tokens(model, pixels), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        step += 1
        session += 1
        if step % (log_every * 4) == 0 or step == cfg.vision_steps:
            tower.eval()
            with torch.no_grad():
                acc = pv.object_accuracy(heads, pv.encoder_tokens(model, held_pixels), held_targets)
            tower.train()
            history.append({"step": step, "loss": float(np.mean(losses[-log_every:])), "accuracy": acc})
            table = "  ".join(f"{k}={v:.2f}" for k, v in acc.items() if not k.startswith("colour"))
            print(f"stage 1 step {step}/{cfg.vision_steps}  loss {np.mean(losses[-log_every:]):.3f}  "
                  f"{(base_elapsed + time.time() - t0) / 60:.1f} min\n  {table}", flush=True)
        if time.time() - last_ckpt > ckpt_minutes * 60.0:
            save()
            last_ckpt = time.time()
    tower.eval()
    save()
    return session, True


def run(
    out: Path,
    *,
    minutes: float | None,
    steps: int | None,
    threads: int,
    cfg: TrainConfig,
    device: str = "cpu",
    world_config: WorldConfig | None = None,
    eval_minutes: float = 5.0,
    ckpt_minutes: float = 5.0,
    keep_checkpoint: bool = False,
    log_every: int = 25,
    stop_after: int | None = None,
    command: str = "",
) -> dict[str, Any] | None:
    """Train (or resume) into ``out``; returns the ``training.json`` record.

    ``stop_after`` ends this session after that many steps with only the checkpoint written
    (returns ``None``); running again resumes. Training in chunks this way gives the same
    weights as one uninterrupted run with the same ``steps``, seed and thread count.
    """
    import torch

    if minutes is None and steps is None:
        raise ValueError("give --minutes or --steps")
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    world = World(world_config)
    model, processor = micro.build_untrained(cfg.seed, cfg.model)
    model.to(device)
    grid = cfg.model.image_size // cfg.model.patch_size
    encoder = Encoder(processor, cfg.model.image_tokens, patch_grid=grid if cfg.aux_weight > 0 else None)
    eval_encoder = Encoder(processor, cfg.model.image_tokens)
    aux_head = make_aux_head(model).to(device) if cfg.aux_weight > 0 else None
    optimizer = make_optimizer(model, cfg, aux_head)
    n_params = micro.count_parameters(model)

    step, elapsed, total_steps = 0, 0.0, steps
    history: list[dict[str, Any]] = []
    stage1_steps = 0
    if cfg.vision_steps > 0 and not ckpt_path.exists():
        stage1_steps, finished = pretrain_vision_stage(model, processor, world, cfg, out, device=device,
                                                       ckpt_minutes=ckpt_minutes, log_every=log_every,
                                                       stop_after=stop_after)
        if not finished:
            print(f"stopped in stage 1 after {stage1_steps} steps; rerun to resume", flush=True)
            return None
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state["seed"] != cfg.seed:
            raise SystemExit(f"{ckpt_path} belongs to seed {state['seed']}, not {cfg.seed}; use another --out")
        model.load_state_dict(state["model"])
        if aux_head is not None:
            aux_head.load_state_dict(state["aux_head"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        total_steps = steps if steps is not None else state["total_steps"]
        print(f"resumed from {ckpt_path} at step {step} ({elapsed / 60:.1f} min done)", flush=True)
    print(f"micro model: {n_params:,} parameters; threads={threads}; batch={cfg.batch_size}; seed={cfg.seed}",
          flush=True)

    suite = EvalSuite(world, eval_encoder, cfg.eval_n, cfg.crop_side)
    t_eval = time.time()
    if step == 0:
        metrics = suite(model)
        history.append({"step": 0, "elapsed": 0.0, "metrics": metrics})
        print("step 0 (untrained):\n" + format_metrics(metrics), flush=True)
    eval_cost = time.time() - t_eval
    budget = minutes * 60.0 if minutes is not None else math.inf

    session_start = time.time()
    base_elapsed = elapsed
    last_ckpt = last_eval = time.time()
    losses: list[float] = []
    timing_steps, timing_start = 0, time.time()
    session_steps = stage1_steps

    def save_ckpt() -> None:
        _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                      "aux_head": aux_head.state_dict() if aux_head is not None else None,
                      "elapsed": base_elapsed + time.time() - session_start, "total_steps": total_steps,
                      "history": history, "seed": cfg.seed}, ckpt_path)

    while total_steps is None or step < total_steps:
        now_elapsed = base_elapsed + time.time() - session_start
        if now_elapsed > budget:
            print(f"time budget reached at step {step}", flush=True)
            break
        if stop_after is not None and session_steps >= stop_after:
            save_ckpt()
            print(f"stopped after {session_steps} steps at step {step}; rerun to resume", flush=True)
            return None
        rng = np.random.default_rng([cfg.seed, step, 2])
        two = bool(rng.random() < cfg.two_image_frac)
        batch = encoder(world.batch(cfg.seed, step, cfg.batch_size, two_image=two))
        lr = lr_at(step, total_steps or 10**9, cfg)
        losses.append(train_step(model, optimizer, batch, lr, cfg.grad_clip, aux_head, cfg.aux_weight))
        step += 1
        session_steps += 1
        timing_steps += 1
        if total_steps is None and timing_steps == 30:
            per_step = (time.time() - timing_start) / timing_steps
            remaining = budget - (base_elapsed + time.time() - session_start)
            n_evals = remaining / (eval_minutes * 60.0) + 2
            total_steps = step + max(1, int((remaining - n_evals * eval_cost) / per_step))
            print(f"{per_step:.2f} s/step -> {total_steps} steps in the budget", flush=True)
        if step % log_every == 0:
            spent = base_elapsed + time.time() - session_start
            print(f"step {step}/{total_steps or '?'}  loss {np.mean(losses[-log_every:]):.4f}  lr {lr:.2e}  "
                  f"{spent / 60:.1f} min", flush=True)
        if time.time() - last_eval > eval_minutes * 60.0:
            t0 = time.time()
            metrics = suite(model)
            eval_cost = time.time() - t0
            history.append({"step": step, "elapsed": base_elapsed + time.time() - session_start,
                            "loss": float(np.mean(losses[-log_every:])), "metrics": metrics})
            print(f"eval at step {step}:\n" + format_metrics(metrics), flush=True)
            last_eval = time.time()
        if time.time() - last_ckpt > ckpt_minutes * 60.0:
            save_ckpt()
            last_ckpt = time.time()

    train_time = base_elapsed + time.time() - session_start
    save_ckpt()
    extra = {"micro": micro.config_dict(cfg.model), "world": _world_dict(world.config)}
    micro.save(model, processor, out, extra=extra)
    # the final numbers come from the weights as shipped: reload from disk (float16 round trip)
    loaded, loaded_processor = micro.load(out)
    loaded.to(device)
    final = EvalSuite(world, Encoder(loaded_processor, cfg.model.image_tokens), cfg.eval_n, cfg.crop_side)(loaded)
    print(f"final ({step} steps, {train_time / 60:.1f} min, reloaded from {out}):\n" + format_metrics(final),
          flush=True)
    record = {
        "command": command,
        "seed": cfg.seed,
        "threads": threads,
        "device": device,
        "steps": step,
        "planned_steps": total_steps,
        "train_seconds": round(train_time, 1),
        "seconds_per_step": round(train_time / max(step, 1), 3),
        "parameters": n_params,
        "final_loss": float(np.mean(losses[-log_every:])) if losses else None,
        "final_metrics": final,
        "history": history,
        "vision_stage": _vision_record(out / "vision.pt"),
        "train_config": {k: v for k, v in asdict(cfg).items() if k != "model"},
        "micro_config": micro.config_dict(cfg.model),
        "world_config": _world_dict(world.config),
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    if not keep_checkpoint:
        ckpt_path.unlink(missing_ok=True)
        (out / "vision.pt").unlink(missing_ok=True)
    return record


def _vision_record(path: Path) -> dict[str, Any] | None:
    """Stage 1's steps, time and accuracy log from its checkpoint (None when it was skipped)."""
    import torch

    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    return {"steps": state["step"], "seconds": round(state["elapsed"], 1), "history": state["history"]}


def _world_dict(cfg: WorldConfig) -> dict[str, Any]:
    d = asdict(cfg)
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}


def main(argv: Sequence[str] | None = None, prog: str = "python -m innersight.demo.train") -> int:
    """Command-line entry point (also ``innersight train-micro``, which passes its own ``prog``)."""
    ap = _OneLineParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output directory (weights, training.json)")
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock training budget")
    ap.add_argument("--steps", type=int, default=None,
                    help="exact number of stage-2 steps (whole model; overrides the --minutes estimate)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--device", default="cpu", help="torch device to train on (default: cpu)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--aux-weight", type=float, default=TrainConfig.aux_weight,
                    help="weight of the auxiliary per-patch loss (0: answer tokens only)")
    ap.add_argument("--vision-steps", type=int, default=None,
                    help="stage 1: steps of vision-tower training before the whole model trains (0: skip; "
                         f"default {TrainConfig.vision_steps}, or --steps when that is fewer)")
    ap.add_argument("--eval-n", type=int, default=TrainConfig.eval_n, help="held-out samples per cell")
    ap.add_argument("--eval-minutes", type=float, default=5.0)
    ap.add_argument("--ckpt-minutes", type=float, default=5.0)
    ap.add_argument("--keep-checkpoint", action="store_true")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--stop-after", type=int, default=None,
                    help="end this session after N steps, keeping the checkpoint (rerun to resume)")
    args = ap.parse_args(argv)
    if args.minutes is None and args.steps is None:
        ap.error("give --minutes or --steps")
    _check_args(ap, args)
    vision_steps = args.vision_steps
    if vision_steps is None:  # a short --steps run is a short run, stage 1 included
        vision_steps = TrainConfig.vision_steps if args.steps is None else min(TrainConfig.vision_steps, args.steps)
    cfg = TrainConfig(seed=args.seed, batch_size=args.batch_size, lr=args.lr, eval_n=args.eval_n,
                      aux_weight=args.aux_weight, vision_steps=vision_steps)
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "innersight.demo.train",
                                                *(argv if argv is not None else sys.argv[1:])])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(args.out, minutes=args.minutes, steps=args.steps, threads=args.threads, cfg=cfg, device=args.device,
        eval_minutes=args.eval_minutes, ckpt_minutes=args.ckpt_minutes, keep_checkpoint=args.keep_checkpoint,
        log_every=args.log_every, stop_after=args.stop_after, command=command)
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit code 2, like every innersight command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every numeric argument in range and the device well-formed, before anything is built
    (``ap.error`` prints one line of usage error and exits 2)."""
    from ..errors import UserInputError
    from ..loading import check_device

    at_least = {"--steps": (args.steps, 1), "--threads": (args.threads, 1), "--batch-size": (args.batch_size, 1),
                "--vision-steps": (args.vision_steps, 0), "--eval-n": (args.eval_n, 1),
                "--log-every": (args.log_every, 1), "--stop-after": (args.stop_after, 1)}
    for flag, (value, low) in at_least.items():
        if value is not None and value < low:
            ap.error(f"{flag} must be at least {low}, not {value}")
    positive = {"--minutes": args.minutes, "--lr": args.lr, "--eval-minutes": args.eval_minutes,
                "--ckpt-minutes": args.ckpt_minutes}
    for flag, number in positive.items():
        if number is not None and not number > 0:
            ap.error(f"{flag} must be positive, not {number}")
    if args.aux_weight < 0:
        ap.error(f"--aux-weight must be 0 or more, not {args.aux_weight}")
    try:
        check_device(args.device)
    except UserInputError as exc:
        ap.error(str(exc))
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out} is a file, not a folder")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
