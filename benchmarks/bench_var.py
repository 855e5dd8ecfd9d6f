"""VAR: per-token latency and peak memory, relative to plain generation and to an eager-everything
reference, in the same run.

Same model, image, timing, interleaving, process isolation and memory measure as
``bench_decoding.py`` (its harness is imported from there; read its docstring). Compared:

* ``plain``: a plain answer;
* ``var``: innersight's VAR (SDPA everywhere; only the rows VAR may change get explicit
  probabilities, at the layers it may change);
* ``reference``: the slow path written here, as the original code works: every layer of the
  language model computes its attention explicitly, with probabilities for every query row
  (logits in the model dtype, softmax in fp32, like transformers' ``eager``), and at VAR's layers
  the redistribution is applied to every row and kept where VAR allows it. The sink masks are
  VAR's own (:class:`~innersight.attend.var.VARRun`), so both paths change the same rows.

A random model has no massive activations, so VAR would change nothing. All three variants run
with the same *planted* sinks: a forward hook on decoder layer 0 adds ``+magnitude`` / ``-magnitude``
to two hidden dimensions at the first token and at every ``--every``-th image token of the prompt
(the residual stream carries them on), and VAR is told those dimensions (``sink_dims``) with a
``tau`` below the planted tokens' ``phi = sqrt(D / 2)`` (``min(20, 0.8 sqrt(D / 2))``). The table
shows how many (sample, head, row) triples VAR redistributed out of those it was allowed to change
(prefill and decoding steps, all layers), and the visual sinks it found.

    python benchmarks/bench_var.py                      # tiny LLaVA on CPU
    python benchmarks/bench_var.py --shape 7b --device cuda --dtype bf16   # LLaVA-1.5-7B shape

Target (issue #5, per-token latency at 7B scale on a GPU): VAR <= 1.2x plain.
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decoding import (  # noqa: E402 - the shared harness beside this script
    QUESTION,
    SHAPES,
    Call,
    _ratio,
    header,
    measure,
    options_from,
    parser,
    processor_dir,
    random_image,
    summarise,
    table,
    write_json,
)

VARIANTS = ("plain", "var", "reference")
TARGET = 1.2


# ---------------------------------------------------------------------- planted sinks
def plant_dims(hidden_size: int) -> tuple[int, int]:
    """The two hidden dimensions that carry the planted massive activations."""
    return hidden_size // 4, (3 * hidden_size) // 4 + 1


def plant_tau(hidden_size: int) -> float:
    """A sink threshold the planted tokens pass (their phi is about sqrt(D / 2)) and random ones do not."""
    return min(20.0, 0.8 * math.sqrt(hidden_size / 2))


def planted(mllm: Any, dims: tuple[int, int], magnitude: float, every: int) -> contextlib.AbstractContextManager[None]:
    """Inside the block, prompt forwards carry massive activations at ``dims`` (+/- ``magnitude``)
    after decoder layer 0, at the first real token and at image tokens ``0, every, 2 every, ...``."""
    from innersight.testing.planting import planted_activations

    return planted_activations(mllm, dims, magnitude, every, offset=0)


def eager_probs(query: Any, key: Any, attention_mask: Any, scaling: float) -> Any:
    """Attention probabilities of every query row, [B, H, Lq, Lk] fp32: logits in the model
    dtype, softmax in fp32 (transformers' eager); causal when no mask is given."""
    import torch

    from innersight.attention import additive_mask, repeat_kv

    k = repeat_kv(key, query.shape[1])  # [B, H, Lk, d]
    logits = torch.matmul(query, k.transpose(-1, -2)) * scaling  # [B, H, Lq, Lk]
    lq, lk = query.shape[2], key.shape[2]
    if attention_mask is not None:
        logits = logits + additive_mask(attention_mask[:, :, :, :lk], logits.dtype)
    else:
        qpos = torch.arange(lk - lq, lk, device=query.device)  # [Lq] absolute positions
        future = torch.arange(lk, device=query.device)[None, :] > qpos[:, None]  # [Lq, Lk]
        logits = logits.masked_fill(future, torch.finfo(logits.dtype).min)
    return torch.softmax(logits.float(), dim=-1)


def _reference_run_class() -> type:
    """:class:`~innersight.attend.var.VARRun` with eager handlers (imported lazily: no torch at
    import time)."""
    import torch

    from innersight.attend.var import VARRun, redistribute
    from innersight.attention import repeat_kv

    class EagerVARRun(VARRun):
        """VAR's sink masks and counters, with every row's probabilities computed explicitly."""

        def plain_handler(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
            """Eager attention of a layer VAR does not touch: [B, Lq, H, d]."""
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            probs = eager_probs(query, key, attention_mask, scale).to(value.dtype)  # [B, H, Lq, Lk]
            out = torch.matmul(probs, repeat_kv(value, query.shape[1]))  # [B, H, Lq, d]
            return out.transpose(1, 2).contiguous(), None

        def handler(self, layer: int) -> Any:
            def attend(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
                rows, heads, lq, _ = query.shape
                lk = key.shape[2]
                device = query.device
                scale = scaling if scaling is not None else query.shape[-1] ** -0.5
                probs = eager_probs(query, key, attention_mask, scale)  # [B, H, Lq, Lk] fp32
                sinks = self._sinks(layer, rows, lq, lk, device)  # [B, Lk]
                _, image0, last0 = self._prompt_masks(device)
                image = self._keys(image0, rows, lk)  # [B, Lk]
                new, qualifies = redistribute(probs, sinks[:, None, None, :], image[:, None, None, :],
                                              p=self.config.effective_p, rho=self.rho,
                                              min_image_attention=self.config.min_image_attention)
                position = torch.arange(lk - lq, lk, device=device)  # [Lq]
                last = last0.repeat_interleave(self._repeats(rows))  # [B]
                eligible = (position[None, :] > last[:, None]) & (sinks & image).any(dim=1)[:, None]  # [B, Lq]
                changed = qualifies & eligible[:, None, :]  # [B, H, Lq]
                self._changed[layer] = self._changed.get(layer, 0) + changed.sum()
                self._eligible[layer] = self._eligible.get(layer, 0) + eligible.sum() * heads
                probs = torch.where(changed[..., None], new, probs).to(value.dtype)  # [B, H, Lq, Lk]
                out = torch.matmul(probs, repeat_kv(value, heads))  # [B, H, Lq, d]
                return out.transpose(1, 2).contiguous(), None

            return attend

    return EagerVARRun


@contextlib.contextmanager
def eager_var(var: Any, mllm: Any, batch: Any) -> Iterator[Any]:
    """The reference: every decoder layer through an eager handler, VAR's layers redistributing
    every row VAR may change. Yields the run (its ``stats`` as VAR's)."""
    from innersight.attend.sinks import layer_inputs
    from innersight.attention import layer_handlers

    layers = var.layers(mllm)
    run = _reference_run_class()(var.config, var.sink_dims(mllm), batch, layers)
    decoder = mllm.adapter.decoder_layers
    handlers = {i: run.handler(i) if i in layers else run.plain_handler for i in range(len(decoder))}
    with layer_inputs(decoder, layers, run.observe), layer_handlers(mllm.model, decoder, handlers):
        yield run


def run_info(run: Any) -> dict[str, Any]:
    """What VAR did in one call: rows changed / allowed (all layers, prefill and steps), sinks."""
    stats = run.stats if run is not None else {}
    changed = sum(s.changed_rows for s in stats.values())
    eligible = sum(s.eligible_rows for s in stats.values())
    first = stats[min(stats)] if stats else None
    return {"changed_rows": changed, "eligible_rows": eligible,
            "visual_sinks": first.visual_sinks[0] if first and first.visual_sinks else 0,
            "text_sinks": first.text_sinks[0] if first and first.text_sinks else 0,
            "layers": sorted(stats)}


# ---------------------------------------------------------------------- the variants
def var_calls(mllm: Any, options: dict[str, Any]) -> dict[str, Call]:
    """plain / var / reference, all with the same planted sinks, image, question and length."""
    from innersight.attend.var import VAR, VARConfig
    from innersight.methods import resolve_methods

    image = random_image()
    tokens = int(options["tokens"])
    generation = {"max_new_tokens": tokens, "min_new_tokens": tokens}
    hidden = mllm.adapter.hidden_size
    dims = plant_dims(hidden)
    fields = {"sink_dims": dims, "tau": plant_tau(hidden), "p": options["p"], "rho": options["rho"], "cache": False}
    plant = (dims, float(options["magnitude"]), int(options["every"]))
    plan = resolve_methods(["var"], {"var": fields})
    reference_var = VAR(VARConfig(**fields))

    def plain(extra: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
        with planted(mllm, *plant):
            return mllm.answer(image, QUESTION, **generation, **extra).token_ids, {}

    def var(extra: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
        with planted(mllm, *plant):
            answer = plan.run(mllm, [image], [QUESTION], **generation, **extra)[0]
        return answer.token_ids, run_info(plan.objects[0].last_run)

    def reference(extra: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
        with planted(mllm, *plant):
            batch = mllm.prepare([image], [QUESTION])
            with eager_var(reference_var, mllm, batch) as run:
                ids = mllm.generate(batch, **generation, **extra)[0]
            mllm.decode(ids)
        return ids, run_info(run)

    return {"plain": plain, "var": var, "reference": reference}


# ---------------------------------------------------------------------- main
def run(args: Any) -> dict[str, Any]:
    """Measure the three variants; returns ``{"rows": summary per variant, "vs_reference": ...}``."""
    with tempfile.TemporaryDirectory() as tmp:
        options = {"p": args.p, "rho": args.rho, "magnitude": args.magnitude, "every": args.every,
                   **options_from(args, processor_dir(args.shape, Path(tmp) / "processor"))}
        results = measure(var_calls, VARIANTS, options)
    rows = summarise(results)
    ref = rows["reference"]
    for row in rows.values():
        row["x_reference_per_token"] = _ratio(row["per_token_s"], ref["per_token_s"])
        row["x_reference_total"] = _ratio(row["total_s"], ref["total_s"])
        row["x_reference_mem"] = _ratio(row["peak_mb"], ref["peak_mb"])
    same = rows["var"]["token_ids"] == ref["token_ids"]
    return {"rows": rows, "same_tokens_as_reference": same, "results": results}


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--p", type=float, default=0.6, help="VAR p (share of sink attention moved)")
    p.add_argument("--rho", type=float, default=0.8, help="VAR rho (the paper's general-task 0.8)")
    p.add_argument("--every", type=int, default=8, help="plant a sink at every N-th image token")
    p.add_argument("--magnitude", type=float, default=1000.0, help="size of the planted activations")
    args = p.parse_args(argv)
    out = run(args)
    rows = out["rows"]

    def vs_ref(name: str, r: dict[str, Any]) -> str:
        return f"{r['x_reference_per_token']:.2f}"

    def vs_ref_mem(name: str, r: dict[str, Any]) -> str:
        return f"{r['x_reference_mem']:.2f}"

    def target(name: str, r: dict[str, Any]) -> str:
        return f"<= {TARGET:.2f}x" if name == "var" else ""

    def changed(name: str, r: dict[str, Any]) -> str:
        info = r["info"]
        if "changed_rows" not in info:
            return ""
        return f"{info['changed_rows']}/{info['eligible_rows']} rows, {info['visual_sinks']} vis sinks"

    shape = SHAPES[args.shape]
    print(header(args) + f" p={args.p} rho={args.rho} sink_dims={plant_dims(shape['hidden_size'])} "
          f"tau={plant_tau(shape['hidden_size']):.2f} every={args.every} magnitude={args.magnitude}")
    print(table(rows, {"x ref ms/tok": vs_ref, "x ref mem": vs_ref_mem, "7B target (ms/token)": target,
                       "VAR changed (all layers)": changed}))
    print(f"var and reference give the same answer tokens: {out['same_tokens_as_reference']}")
    write_json(args.json, args, rows, out["results"], target=TARGET,
               same_tokens_as_reference=out["same_tokens_as_reference"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
