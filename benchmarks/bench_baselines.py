"""The training-free baselines (PAI, M3ID, ICD, VISTA, ONLY): cost relative to plain generation,
and side by side with the peer library mitigv 0.1.7 on the same saved checkpoint.

Part 1 (always): every method answers the same question about the same random image with the same
fixed answer length (``min_new_tokens = max_new_tokens = --tokens``, greedy) on a random-weight
LLaVA-shaped model (``--shape proxy``: 576 image tokens, 32064-token vocabulary, decoder 768 wide x
12 layers; the harness, timing and interleaving are ``bench_decoding.py``'s: read its docstring).
All variants run in this one process on one model (``--isolate none``), interleaved round by round.

Part 2 (``--peer PYTHON``): the same checkpoint is saved to disk once and loaded by both libraries;
``PYTHON`` is the interpreter of a separate virtual environment holding mitigv (never a dependency
of innersight)::

    python -m venv --system-site-packages /tmp/mitigv
    /tmp/mitigv/bin/pip install --no-deps mitigv==0.1.7      # its only requirement is torch: reuse ours
    python benchmarks/bench_baselines.py --shape proxy --peer /tmp/mitigv/bin/python

For each method both libraries have, a mitigv worker process (driven over a pipe, one call at a
time) and this process alternate calls round by round, each generating ``--tokens`` greedy tokens
about the same image and question with its own default settings for that method. mitigv has no
``min_new_tokens``: the driver turns its end-of-sequence stop off (``_eos_token_id -> None``) so that
both produce exactly ``--tokens`` tokens, and counts its decoding steps; times are compared per
generated token.
The reported ratio is innersight / mitigv (below 1: innersight faster). A method mitigv cannot run
is reported with its error, not hidden.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decoding import (  # noqa: E402 - the shared harness beside this script
    QUESTION,
    header,
    make_mllm,
    measure,
    method_call,
    options_from,
    parser,
    processor_dir,
    random_image,
    summarise,
    table,
)

#: variant -> (method name, settings)
VARIANTS: dict[str, tuple[str, dict[str, dict[str, Any]] | None]] = {
    "plain": ("", None),
    "pai": ("pai", None),
    "pai-attention": ("pai-attention", None),
    "m3id": ("m3id", None),
    "m3id-serial": ("m3id", {"m3id": {"branch": "serial"}}),
    "icd": ("icd", None),
    "icd-serial": ("icd", {"icd": {"branch": "serial"}}),
    "vista": ("vista", None),
    "only": ("only", None),
    "vcd": ("vcd", None),
}
#: methods both libraries implement (innersight name -> mitigv name)
SHARED = {"pai": "pai", "m3id": "m3id", "icd": "icd", "vista": "vista", "only": "only", "vcd": "vcd"}


def baseline_calls(mllm: Any, options: dict[str, Any]) -> dict[str, Any]:
    image = random_image()
    tokens = int(options["tokens"])
    generation = {"max_new_tokens": tokens, "min_new_tokens": tokens}

    def plain(extra: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
        return mllm.answer(image, QUESTION, **generation, **extra).token_ids, {}

    def attention_only(name: str) -> Any:  # no processors to spy on: an attention-point method
        def call(extra: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
            return mllm.answer(image, QUESTION, methods=[name], **generation, **extra).token_ids, {}

        return call

    calls: dict[str, Any] = {"plain": plain}
    for variant, (name, settings) in VARIANTS.items():
        if name == "pai-attention":
            calls[variant] = attention_only(name)
        elif name:
            calls[variant] = method_call(mllm, name, settings, image, QUESTION, generation)
    return calls


# ---------------------------------------------------------------------- the peer
PEER_DRIVER = r'''
import json, sys, time, traceback
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
from mitigv import mitigate

checkpoint, image_path, question, tokens, threads = sys.argv[1:6]
torch.set_num_threads(int(threads))
model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(checkpoint)
image = Image.open(image_path).convert("RGB")
overrides = {"pai": {"end_layer": model.config.text_config.num_hidden_layers}}
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    name = line.strip()
    if not name:
        break
    try:
        with mitigate(name, model=model, processor=processor, max_new_tokens=int(tokens), do_sample=False,
                      **overrides.get(name, {})) as f:
            # the same answer length as innersight's min_new_tokens = max_new_tokens: no stop at EOS,
            # and the decoding steps counted (the random model's ids need not decode to text)
            f._eos_token_id = lambda: None
            steps = [0]
            step_logits = f._step_logits

            def counted(*args, **kwargs):
                steps[0] += 1
                return step_logits(*args, **kwargs)

            f._step_logits = counted
            t0 = time.perf_counter()
            text = f(image, question)
            elapsed = time.perf_counter() - t0
        print(json.dumps({"ok": True, "seconds": elapsed, "tokens": steps[0], "text": text}), flush=True)
    except Exception as exc:
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}",
                          "where": traceback.format_exc().strip().splitlines()[-3:]}), flush=True)
'''


def save_checkpoint(shape: str, directory: Path) -> Path:
    """The random-weight model of ``shape`` with its processor, saved for both libraries."""
    proc_dir = processor_dir(shape, directory / "processor")
    mllm = make_mllm(shape, proc_dir)
    out = directory / "checkpoint"
    mllm.model.save_pretrained(out)
    mllm.processor.save_pretrained(out)
    return out


def peer_comparison(args: Any) -> dict[str, Any]:
    """Alternate innersight and mitigv calls per shared method on one saved checkpoint."""
    import torch

    import innersight

    torch.set_num_threads(args.threads)
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_checkpoint(args.shape, Path(tmp))
        image_path = Path(tmp) / "image.png"
        random_image().save(image_path)
        mllm = innersight.load(str(checkpoint), device="cpu")
        image = random_image()
        peer = subprocess.Popen([args.peer, "-c", PEER_DRIVER, str(checkpoint), str(image_path), QUESTION,
                                 str(args.tokens), str(args.threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        try:
            assert peer.stdout is not None and peer.stdin is not None
            json.loads(peer.stdout.readline())  # loaded

            def peer_call(name: str) -> dict[str, Any]:
                peer.stdin.write(name + "\n")
                peer.stdin.flush()
                return json.loads(peer.stdout.readline())

            def ours(name: str) -> dict[str, Any]:
                t0 = time.perf_counter()
                answer = mllm.answer(image, QUESTION, methods=[name], max_new_tokens=args.tokens,
                                     min_new_tokens=args.tokens)
                return {"ok": True, "seconds": time.perf_counter() - t0, "tokens": len(answer.token_ids)}

            for name, peer_name in SHARED.items():
                ours(name)  # warm-up
                warm = peer_call(peer_name)
                if not warm.get("ok"):
                    rows[name] = {"peer_error": warm.get("error"), "peer_where": warm.get("where")}
                    continue
                mine, theirs = [], []
                for r in range(args.repeats):
                    first, second = (ours, peer_call) if r % 2 == 0 else (peer_call, ours)
                    a = first(name if first is ours else peer_name)
                    b = second(name if second is ours else peer_name)
                    (mine, theirs)[0 if first is ours else 1].append(a)
                    (mine, theirs)[1 if first is ours else 0].append(b)
                if not all(t.get("ok") for t in theirs):
                    rows[name] = {"peer_error": next(t["error"] for t in theirs if not t.get("ok"))}
                    continue
                per_ours = statistics.median(m["seconds"] / max(1, m["tokens"]) for m in mine)
                per_peer = statistics.median(t["seconds"] / max(1, t["tokens"]) for t in theirs)
                rows[name] = {"innersight_s": statistics.median(m["seconds"] for m in mine),
                              "mitigv_s": statistics.median(t["seconds"] for t in theirs),
                              "innersight_tokens": mine[-1]["tokens"], "mitigv_tokens": theirs[-1]["tokens"],
                              "innersight_ms_per_token": 1000 * per_ours, "mitigv_ms_per_token": 1000 * per_peer,
                              "ratio_per_token": per_ours / per_peer}
        finally:
            if peer.stdin is not None:
                peer.stdin.close()
            peer.wait(timeout=120)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__)
    p.set_defaults(shape="proxy", isolate="none", repeats=3)
    p.add_argument("--peer", default=None, help="python of a venv with mitigv==0.1.7: run part 2")
    p.add_argument("--skip-own", action="store_true", help="part 2 only")
    args = p.parse_args(argv)
    out: dict[str, Any] = {}
    if not args.skip_own:
        with tempfile.TemporaryDirectory() as tmp:
            options = options_from(args, processor_dir(args.shape, Path(tmp) / "processor"))
            results = measure(baseline_calls, list(VARIANTS), options)
        rows = summarise(results)
        print(header(args))

        def branch(name: str, r: dict[str, Any]) -> str:
            info = r["info"]
            if "branch" not in info:
                return ""
            cache = f" {info['negative_cache']}" if "negative_cache" in info else ""
            return f"{info['branch']}{cache} ({info['negative_forwards']} fw)"

        print(table(rows, {"negative branch": branch}))
        out["rows"] = {k: {kk: vv for kk, vv in v.items() if kk != "token_ids"} for k, v in rows.items()}
    if args.peer:
        peer = peer_comparison(args)
        print(f"\ninnersight vs mitigv 0.1.7, same checkpoint ({args.shape}), {args.tokens} greedy tokens, "
              f"median of {args.repeats} alternated calls")
        for name, r in peer.items():
            if "peer_error" in r:
                print(f"{name:<6} mitigv failed: {r['peer_error']}")
            else:
                print(f"{name:<6} innersight {r['innersight_ms_per_token']:8.1f} ms/token ({r['innersight_tokens']} tok)"
                      f"  mitigv {r['mitigv_ms_per_token']:8.1f} ms/token ({r['mitigv_tokens']} tok)"
                      f"  ratio {r['ratio_per_token']:.2f}")
        out["peer"] = peer
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
