"""The baselines compose with methods at other points: ViCrop (input) before each, and
pai-attention (attention) with each decoding baseline; batch == unbatched in the composition."""

from __future__ import annotations

import pytest

from innersight.errors import MethodError

QUESTIONS = ["what is it?", "is there a dog in the picture?"]
SETTINGS = {"pai": {"start_layer": "0", "alpha": "2"}, "m3id": {"lam": "1"}, "icd": {"alpha": "2"},
            "vista": {"lam": "1"}, "only": {"gamma": "0"}}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("methods", [["vicrop-rel-att", "pai"], ["vicrop-rel-att", "m3id"], ["vicrop-rel-att", "icd"],
                                     ["vicrop-rel-att", "vista"], ["vicrop-rel-att", "only"],
                                     ["pai-attention", "m3id"]])
def test_compositions_run_batched_like_one_by_one(tiny_mllm, image, family, methods):
    mllm = tiny_mllm(family)
    images = [image(0), image(1, 50, 80)]
    keys = {m.split("-")[0] for m in methods}
    settings = {k: v for k, v in SETTINGS.items() if k in keys}
    both = mllm.answer_batch(images, QUESTIONS, methods=methods, settings=settings, max_new_tokens=3)
    alone = [mllm.answer(i, q, methods=methods, settings=settings, max_new_tokens=3).token_ids
             for i, q in zip(images, QUESTIONS)]
    assert [a.token_ids for a in both] == alone
    assert all(a.methods == tuple(methods) for a in both)


def test_two_methods_on_one_layer_are_refused_and_disjoint_layers_compose(tiny_mllm, image):
    mllm = tiny_mllm("llava")
    with pytest.raises(MethodError, match="another attention method"):
        mllm.answer(image(0), QUESTIONS[0], methods=["pai-attention", "only"], settings={"pai": {"start_layer": "0"}})
    answer = mllm.answer(image(0), QUESTIONS[0], methods=["pai-attention", "only"], max_new_tokens=3,
                         settings={"pai": {"start_layer": "1", "alpha": "2"}})
    assert answer.details["only"]["collaborative_steps"]
