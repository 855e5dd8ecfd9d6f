"""Decoding methods: what the model says, changed through ``LogitsProcessor``s.

* :mod:`~innersight.decode.early_exit` — last-position early-exit logits of chosen decoder
  layers, captured by forward hooks during ``generate`` (shared by DeCo and DoLa), and the
  plumbing those decoders share (beam search gives processors log-probabilities; sampling
  warpers must run after the method, not before it).
* :mod:`~innersight.decode.deco` — DeCo, dynamic correction decoding from preceding layers
  ("MLLM Can See? Dynamic Correction Decoding for Hallucination Mitigation", ICLR 2025,
  arXiv 2410.11779).
* :mod:`~innersight.decode.dola` — the DoLa baseline, decoding by contrasting layers
  (Chuang et al., ICLR 2024, arXiv 2309.03883), implemented here rather than through
  ``generate(dola_layers=...)``, which transformers no longer ships.

* training-free baselines, each one module: :mod:`~innersight.decode.pai` (PAI, arXiv 2407.21771,
  also an attention-point part ``pai-attention``), :mod:`~innersight.decode.m3id` (M3ID, arXiv
  2403.14003), :mod:`~innersight.decode.icd` (ICD, arXiv 2403.18715), :mod:`~innersight.decode.vista`
  (VISTA, arXiv 2502.03628) and :mod:`~innersight.decode.only` (ONLY, arXiv 2507.00898); the
  image-free branch they share is :mod:`~innersight.decode.image_free`.

Every processor is built fresh for one ``generate`` call; processors that need hooks are
context managers, entered by :meth:`innersight.methods.Plan.run` around that call only.
"""
