"""User text never becomes control tokens: special-token strings in a question are plain text.

For every family, a question that contains ``<image>``, ``<|image_pad|>``, ``<|vision_start|>``,
the Q-Former's tokens, or the eos/bos strings gives exactly the control tokens (image
placeholders, bos/eos, chat markers) that a plain question gives, in the language model's ids and
in InstructBLIP's Q-Former ids; and it is answered without error.
"""

from __future__ import annotations

from collections import Counter

import pytest
from PIL import Image

from innersight.adapters import FAMILIES  # noqa: E402
from innersight.adapters.base import WORD_JOINER, as_plain_text, control_strings
from innersight.errors import UserInputError

ALWAYS = ["<image>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "[CLS]", "[SEP]", "[MASK]"]


def special_counts(tokenizer, ids) -> Counter:
    """How often each control token id (special, added-special) occurs in ``ids``; the unknown
    token is left out (a character outside a tiny word-level vocabulary is unknown, not control)."""
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    special.discard(tokenizer.unk_token_id)
    return Counter(int(i) for i in ids if int(i) in special)


def injected(mllm) -> list[str]:
    """The strings to smuggle into a question: the issue's list plus this model's eos/bos, image
    placeholder and every other control string its processor knows."""
    tok = mllm.adapter.tokenizer
    extra = [tok.eos_token, tok.bos_token, getattr(mllm.processor, "image_token", None)]
    return sorted({str(s) for s in [*ALWAYS, *extra, *mllm.adapter.control_strings] if s})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("template", ["chat", "reference"])
def test_control_strings_in_a_question_are_plain_text(tiny_mllm, family, template):
    mllm = tiny_mllm(family)
    adapter = mllm.adapter
    image = Image.new("RGB", (64, 48), "red")
    plain = adapter.prepare([[image]], [adapter.format_prompt("what is here ?", 1, template)])
    expected = special_counts(adapter.tokenizer, plain.input_ids[0].tolist())
    assert expected[adapter.image_token_id] > 0
    strings = injected(mllm)
    assert "<image>" in strings and "<|image_pad|>" in strings and adapter.tokenizer.eos_token in strings
    for s in strings:
        prompt = adapter.format_prompt(f"what is {s} here ?", 1, template)
        batch = adapter.prepare([[image]], [prompt])  # the processor counted one image placeholder
        got = special_counts(adapter.tokenizer, batch.input_ids[0].tolist())
        assert got == expected, (family, template, s)
        assert s.replace(WORD_JOINER, "") in prompt.replace(WORD_JOINER, "")  # the text is still there
        if "qformer_input_ids" in batch.inputs:
            qtok = mllm.processor.qformer_tokenizer
            q_plain = special_counts(qtok, plain.inputs["qformer_input_ids"][0].tolist())
            assert special_counts(qtok, batch.inputs["qformer_input_ids"][0].tolist()) == q_plain, s


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_with_control_strings_works(tiny_mllm, family):
    mllm = tiny_mllm(family)
    tok = mllm.adapter.tokenizer
    question = f"what is <image> <|image_pad|> <|vision_start|> [SEP] {tok.eos_token} {tok.bos_token} here ?"
    answers = mllm.answer_batch([Image.new("RGB", (64, 48), "red")] * 2, [question, "what is here ?"],
                                max_new_tokens=2)
    assert answers[0].question == question  # the user's text, as given
    assert len(answers) == 2


def test_micro_cli_answers_a_question_with_image_tokens(capsys):
    """The issue's case through the command line: exit 0, an answer, no processor error."""
    import tempfile

    from innersight.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/red.png"
        Image.new("RGB", (64, 64), "red").save(path)
        with pytest.raises(SystemExit) as exc:
            main(["answer", "--model", "micro", "--image", path, "--question", "what is <image> here ?",
                  "--max-new-tokens", "2", "--json"])
            raise SystemExit(0)
    out, err = capsys.readouterr()
    assert exc.value.code == 0, err
    assert '"question": "what is <image> here ?"' in out


def test_benchmark_questions_are_plain_text_too(tiny_mllm, tmp_path):
    """Benchmark questions go through the same prompt path: no sample fails."""
    from innersight.eval.benchmarks import get_benchmark
    from innersight.eval.runner import evaluate

    mllm = tiny_mllm("llava")
    bench = get_benchmark("micro-details")
    samples = bench.load(None, "all", n=3)
    for s, extra in zip(samples, ["<image>", "</s> <s>", "<image><image>"]):
        s["question"] = f"{s['question']} {extra}"
    results = evaluate(mllm, bench, None, "all", output_dir=tmp_path / "run", samples=samples, batch_size=3,
                       generation={"max_new_tokens": 2}, progress=False)
    assert results["counts"] == {"samples": 3, "scored": 3, "errors": 0, "unknown": results["counts"]["unknown"]}


def _bpe_and_bert():
    """A byte-level BPE tokenizer (Qwen's kind) and a BERT WordPiece one (the Q-Former's kind),
    trained here on a few words, with their control tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["what is here ? the red cat sits on a mat"] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|image_pad|>", "<|vision_start|>"]))
    qwen_like = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                        additional_special_tokens=["<|image_pad|>", "<|vision_start|>"])
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator(corpus, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]))
    bert_like = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", sep_token="[SEP]",
                                        cls_token="[CLS]", pad_token="[PAD]", mask_token="[MASK]")
    return qwen_like, bert_like


def test_plain_text_under_byte_level_bpe_and_bert_normaliser():
    qwen_like, bert_like = _bpe_and_bert()
    tokenizers = [qwen_like, bert_like]
    strings = control_strings(tokenizers)
    assert {"<|image_pad|>", "<|vision_start|>", "<|endoftext|>", "[SEP]", "[CLS]"} <= set(strings)
    text = "what <|image_pad|> is [SEP] here <|endoftext|> ?"
    plain = as_plain_text(text, strings, tokenizers)
    assert plain.replace(WORD_JOINER, "") == text
    for tok in tokenizers:
        raw = special_counts(tok, tok(text, add_special_tokens=False)["input_ids"])
        assert sum(raw.values()) >= 1  # as given, the text holds control tokens
        leaked = special_counts(tok, tok(plain, add_special_tokens=False)["input_ids"])
        assert not leaked, leaked
    # byte-level BPE keeps every character: the decoded text shows what the user typed
    assert qwen_like.decode(qwen_like(plain, add_special_tokens=False)["input_ids"]) == plain
    assert as_plain_text("nothing special", strings, tokenizers) == "nothing special"


def test_a_control_string_that_cannot_be_broken_is_refused():
    with pytest.raises(UserInputError, match="cannot be written as plain text"):
        as_plain_text("a § b", ["§"], [])
