"""The input pipeline: images resized and patched in two steps give the processor's exact output, prompts
tokenized from worker threads give the wrapper's exact ids, a prompt far over the limit is refused after
tokenizing a part of it, and ``encode`` does its image work in the workers, a batch ahead of the model."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rge.errors import RGEInputError
from rge.images import VisionPreprocessor
from rge.testing import make_test_image
from rge.tokenization import PromptTokenizer

from .conftest import MAX_PIXELS, MIN_PIXELS

SIZES = [(64, 48), (28, 28), (20, 90), (333, 222), (4000, 3000), (1, 1), (5000, 40), (30, 1200), (57, 57)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("budget", [(MIN_PIXELS, MAX_PIXELS), (256 * 28 * 28, 1024 * 28 * 28)])
def test_resize_then_patch_equals_the_processor_in_one_call(encoder, size, budget):
    processor = encoder.checkpoint.vision.image_processor
    vision = VisionPreprocessor(processor, *budget)
    image = make_test_image(max(size[0], 28), max(size[1], 28), seed=sum(size))
    one_call = processor(images=[image], size={"shortest_edge": budget[0], "longest_edge": budget[1]},
                         return_tensors="pt")  # fmt: skip
    prepared = vision.prepare(image, 0)
    assert list(prepared.grid) == one_call["image_grid_thw"][0].tolist()
    assert prepared.tokens == vision.token_count(image, 0)
    assert torch.equal(prepared.take_pixel_values(), one_call["pixel_values"])


def test_patches_are_made_once_in_a_worker_and_handed_over_once(encoder):
    from concurrent.futures import ThreadPoolExecutor

    prepared = encoder.checkpoint.vision.prepare(make_test_image(90, 60, seed=3), 0)
    expected = prepared.take_pixel_values()  # made now, in this thread: nothing was prefetched
    assert not prepared.ready()
    threads: list[str] = []
    ready = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="worker") as pool:
        prepared.prefetch(pool, lambda patches: threads.append(threading.current_thread().name) or patches * 2,
                          ready.set)  # fmt: skip
        prepared.prefetch(pool, lambda patches: threads.append("again") or patches)  # already on its way
        assert ready.wait(30) and prepared.ready()
    assert threads == ["worker_0"]
    assert torch.equal(prepared.take_pixel_values(), expected * 2)
    assert not prepared.ready()  # not kept: a queued item holds its resized image only


PROMPTS = [
    "plain words, and punctuation!",
    "  leading spaces\n\n\ttabs and newlines   \n",
    "digits 1234567890 and 3.14159",
    "special <|im_start|> tokens <|im_end|> inside",
    "unicode: café, naïve, 東京, emoji 🎉, combining e\u0301",
    "<|vision_start|><|image_pad|><|vision_end|>with an image",
    "",
]


def test_the_private_tokenizer_gives_the_wrappers_ids(encoder):
    wrapper = encoder.checkpoint.tokenizer
    tokenizer = PromptTokenizer(wrapper, encoder.checkpoint.image_pad_id)
    expected = wrapper(PROMPTS, add_special_tokens=False)["input_ids"]
    got = tokenizer(PROMPTS, [None] * len(PROMPTS), max_length=10_000)
    assert [item.input_ids for item in got] == expected
    assert [tokenizer.decode(ids) for ids in expected] == [wrapper.decode(ids) for ids in expected]


WORDS = st.sampled_from(["cat", " dog", "  ", "\n", "\n\n ", "123", "4", "!?", " é", "e\u0301", "東京", "<|im_start|>",
                         "<|im_end|>", "<|vision_start|>", "aaaaaaaaaaaaaaaa", " the", "'s", "--", "\t"])  # fmt: skip


@given(parts=st.lists(WORDS, min_size=150, max_size=400), shift=st.integers(1, 40))
def test_the_lower_bound_never_exceeds_the_true_count(encoder, parts, shift):
    """The first cut lands ``shift`` characters before the end (where a cut word or added token matters most)."""
    tokenizer = PromptTokenizer(encoder.checkpoint.tokenizer, encoder.checkpoint.image_pad_id)
    text = "".join(parts)
    limit = max(1, (len(text) - shift) // 2 - 64)
    true_count = len(encoder.checkpoint.tokenizer(text, add_special_tokens=False)["input_ids"])
    bound = tokenizer.lower_bound(text, limit)
    assert bound is None or limit < bound <= true_count


def test_a_text_far_over_the_limit_is_refused_after_tokenizing_a_part_of_it(encoder, monkeypatch):
    tokenizer = PromptTokenizer(encoder.checkpoint.tokenizer, encoder.checkpoint.image_pad_id)
    seen: list[int] = []
    backend = tokenizer._backend

    class Counting:
        def __getattr__(self, name):
            method = getattr(backend, name)

            def counted(first, *args, **kwargs):
                seen.append(len(first) if isinstance(first, str) else sum(map(len, first)))
                return method(first, *args, **kwargs)

            return counted

    monkeypatch.setattr(tokenizer, "_backend", Counting())
    prose = "many words of ordinary prose, said again. "
    text = prose * 7_000  # 294,000 characters: about 190,000 tokens
    with pytest.raises(RGEInputError, match=r"item 0: prompt of at least \d+ tokens exceeds max_length=20000"):
        tokenizer([text], [None], max_length=20_000)
    assert 0 < sum(seen) < len(text) / 4  # a cut of it was enough
    seen.clear()
    with pytest.raises(RGEInputError, match=r"prompt of at least \d+ tokens exceeds max_length=20000"):
        tokenizer([prose * 50_000], [None], max_length=20_000)
    assert seen == []  # longer than 20,000 of the longest tokens: refused by its length alone


def test_an_exact_fit_passes_and_one_token_more_is_refused(encoder):
    tokenizer = PromptTokenizer(encoder.checkpoint.tokenizer, encoder.checkpoint.image_pad_id)
    text = "a long and even text, " * 400
    count = len(encoder.checkpoint.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert len(tokenizer([text], [None], max_length=count)[0].input_ids) == count
    with pytest.raises(RGEInputError, match=rf"prompt of {count} tokens plus 4 reasoning tokens exceeds"):
        tokenizer([text], [None], max_length=count, budget=4)


def test_encode_does_its_image_work_in_the_workers_and_equals_one_item_at_a_time(encoder, monkeypatch):
    from rge.images import VisionPreprocessor as Vision

    threads: dict[str, set[str]] = {"prepare": set(), "patches": set()}
    for name in threads:
        original = getattr(Vision, name)

        def spy(self, *args, _name=name, _original=original):
            threads[_name].add(threading.current_thread().name.rsplit("_", 1)[0])
            return _original(self, *args)

        monkeypatch.setattr(Vision, name, spy)
    items = [{"text": f"picture {n}", "image": make_test_image(40 + 13 * n, 90 - 5 * n, seed=n)} for n in range(12)]
    together = encoder.encode_query(items, batch_size=4)
    documents = encoder.encode_document(items, batch_size=4)
    assert threads == {"prepare": {"rge-inputs"}, "patches": {"rge-inputs"}}
    monkeypatch.undo()
    alone = np.stack([encoder.encode_query(item) for item in items])
    assert np.allclose(together, alone, atol=1e-5)
    assert np.allclose(documents, np.stack([encoder.encode_document(item) for item in items]), atol=1e-5)
    again = encoder.encode_query(items, batch_size=4)
    assert np.array_equal(together, again)  # the same batches every run, whatever the workers' timing


def test_the_first_bad_item_is_named_even_when_workers_prepare_in_parallel(encoder, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    items = [{"text": f"t{n}", "image": make_test_image(50, 50, seed=n)} for n in range(30)]
    items[21]["image"], items[27]["image"] = str(broken), str(tmp_path / "missing.png")
    with pytest.raises(RGEInputError, match=r"^item 21: image file .* cannot be decoded") as raised:
        encoder.encode_document(items)
    assert raised.value.index == 21 and raised.value.part == "image"
