"""The transformers-free prompt path (host/text.py) against transformers' own tokenizers on the three shipped
tokenizers: the same rendered chat templates, the same ids and character offsets with and without special tokens
split or added, the same whole prompts (ordinary and injection attempts) through graphs/prompts.py, the same
decoded text."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from halfv_export.graphs import get_adapter
from halfv_export.graphs.prompts import tokenize_prompts
from halfv_export.host.text import HostTokenizer
from tests.test_prompt_injection import ATTACKS, BACKBONES, ORDINARY

TEXTS = ORDINARY + ATTACKS + ["", " ", "\n\n", "a" * 300, "<s>", "</s>", "<|im_start|>user"]


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def pair(request, tmp_path_factory):
    """transformers' tokenizer and the host one over the folder an export writes (save_pretrained): transformers 5
    rebuilds some tokenizers' pipelines on load (Qwen2's: an NFC normaliser and its own split regex, which the
    shipped tokenizer.json lacks), and what it saves is the pipeline it runs."""
    adapter = get_adapter(request.param)
    processing = adapter.load_processing(adapter.embedded_dir)
    folder = tmp_path_factory.mktemp(request.param)
    processing.tokenizer.save_pretrained(folder)
    return request.param, processing.tokenizer, HostTokenizer(folder), processing.config


def test_special_ids_and_added_tokens(pair):
    _, hf, host, _ = pair
    assert (host.pad_token_id, host.eos_token_id) == (hf.pad_token_id, hf.eos_token_id)
    assert {i: (t.content, t.special) for i, t in host.added_tokens_decoder.items()} == {
        i: (t.content, t.special) for i, t in hf.added_tokens_decoder.items()}


@pytest.mark.parametrize("text", TEXTS)
def test_chat_template_renders_the_same(pair, text):
    _, hf, host, _ = pair
    for content in ([{"type": "text", "text": text}], [{"type": "image"}, {"type": "text", "text": text}]):
        messages = [{"role": "user", "content": content}]
        for generation in (True, False):
            assert host.apply_chat_template(messages, add_generation_prompt=generation) == hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_offsets_are_the_same(pair, text):
    _, hf, host, _ = pair
    for special in (True, False):
        for split in (True, False):
            want = hf(text, add_special_tokens=special, return_offsets_mapping=True, split_special_tokens=split)
            got = host(text, add_special_tokens=special, return_offsets_mapping=True, split_special_tokens=split)
            assert got["input_ids"] == list(want["input_ids"])
            assert got["offset_mapping"] == [tuple(o) for o in want["offset_mapping"]]


def test_whole_prompts_are_the_same(pair):
    """graphs/prompts.py over both tokenizers: template, image slot, user text kept as text, padding."""
    backbone, hf, host, config = pair
    placeholder, special = BACKBONES[backbone]
    image_id = config.image_token_id
    for images in ([None] * len(TEXTS), [object()] * len(TEXTS)):
        want = tokenize_prompts(hf, images, TEXTS, placeholder, 4, image_id, special)
        got = tokenize_prompts(host, images, TEXTS, placeholder, 4, image_id, special)
        np.testing.assert_array_equal(got[0].numpy(), want[0].numpy())
        np.testing.assert_array_equal(got[1].numpy(), want[1].numpy())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 10_000), max_size=40), st.booleans())
def test_decoded_text_is_the_same(pair, ids, skip):
    _, hf, host, _ = pair
    ids = [i % host.backend.get_vocab_size() for i in ids]  # every id of the vocabulary, added tokens included
    assert host.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
