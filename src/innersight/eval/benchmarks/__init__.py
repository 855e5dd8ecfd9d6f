"""Benchmarks: loaders for each benchmark's official file layout, prompt presets, registry.

``BENCHMARKS`` maps a name (``--benchmark``) to a :class:`~innersight.eval.benchmarks.base.Benchmark`
instance. Every loader reads local files laid out as the benchmark's authors ship them (the
module docstrings name the files) and validates them with one-line
:class:`~innersight.errors.UserInputError` messages. Nothing here imports torch.

========  ===========================================================  ==================
name      files read                                                    splits
========  ===========================================================  ==================
textvqa   TextVQA_0.5.1_val.json + train_images/                        val
vstar     direct_attributes/, relative_position/ (image + json pairs)   all, per category
docvqa    val_v1.0.json + documents/                                    val
pope      coco_pope_<split>.json (JSON lines) + val2014/                random, popular, ...
chair     COCO instances/captions 2014 + val2014/ + an image id list    val2014
gqa       testdev_balanced_questions.json + images/                     testdev, val
aokvqa    aokvqa_v1p0_val.json + val2017/                               val
vqav2     v2 questions + annotations (val2014) + val2014/               val
mme       one folder per subtask (image + txt, or images/ + qa txt)     all, groups, subtask
amber-g   data/annotations.json, relation.json, safe_words.txt,         generative
          data/query/query_generative.json + image/
amber-d   the same with query_discriminative*.json                      all, existence, ...
hrbench   hr_bench_4k.tsv / hr_bench_8k.tsv (images inline, base64)     4k, 8k
========  ===========================================================  ==================

Hosted copies (``--data hf:<repo id or folder>``, read with ``datasets``; see
:mod:`~innersight.eval.benchmarks.hub`): pope (lmms-lab/POPE), textvqa (lmms-lab/textvqa), mme
(lmms-lab/MME), docvqa (lmms-lab/DocVQA), vqav2 (lmms-lab/VQAv2), gqa (lmms-lab/GQA).

>>> sorted(BENCHMARKS)[:3]
['aokvqa', 'chair', 'docvqa']
"""

from __future__ import annotations

from ...errors import UserInputError
from ...registry import Registry
from .amber import AMBERDiscriminative, AMBERGenerative
from .aokvqa import AOKVQA
from .base import Benchmark, Preset, Sample
from .chair import CHAIR
from .docvqa import DocVQA
from .gqa import GQA
from .hrbench import HRBench
from .micro import BENCHMARKS as MICRO_BENCHMARKS
from .mme import MME
from .pope import POPE
from .textvqa import TextVQA
from .vqav2 import VQAv2
from .vstar import VStarBench

__all__ = ["BENCHMARKS", "Benchmark", "Preset", "Sample", "get_benchmark", "register_benchmark"]

#: name -> benchmark instance, in registration order (``--benchmark``, ``innersight list``)
BENCHMARKS: Registry[Benchmark] = Registry("benchmark", missing="unknown benchmark {name!r}; benchmarks: {choices}",
                                           error=UserInputError)


def register_benchmark(benchmark: Benchmark) -> Benchmark:
    """Add ``benchmark`` to :data:`BENCHMARKS` (``ValueError`` if its name is taken)."""
    return BENCHMARKS.register(benchmark.name, benchmark)


for _cls in (TextVQA, VStarBench, DocVQA, POPE, CHAIR, GQA, AOKVQA, VQAv2, MME, AMBERGenerative, AMBERDiscriminative,
             HRBench, *MICRO_BENCHMARKS):
    register_benchmark(_cls())


def get_benchmark(name: str | Benchmark) -> Benchmark:
    """The registered benchmark ``name`` (a :class:`Benchmark` is returned as is)."""
    if isinstance(name, Benchmark):
        return name
    return BENCHMARKS.lookup(name)
