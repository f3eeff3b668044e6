"""The input pipeline: images resized and patched in two steps give the processor's exact output, prompts
tokenized from worker threads give the wrapper's exact ids, a prompt far over the limit is refused after
tokenizing a part of it, and ``encode`` does its image work in the workers, a batch ahead of the model."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rge.errors import RGEInputError
from rge.testing import make_test_image
from rge.tokenization import PromptTokenizer
from rge.vision import VisionPreprocessor

from .conftest import MAX_PIXELS, MIN_PIXELS, load_tiny

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
    assert prepared.tokens == prepared.grid[1] * prepared.grid[2] // 4
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


WORDS = st.sampled_from(["cat", " dog", "  ", "\n", "\n\n ", "123", "4", "!?", " é", "e\u0301", "東京",
                         "<|im_start|>", "<|im_end|>", "<|vision_start|>", "a" * 16, " the", "'s", "--", "\t",
                         " " * 90, "\u0316" * 70])  # fmt: skip


@given(parts=st.lists(WORDS, min_size=150, max_size=400), shift=st.integers(1, 40))
def test_the_lower_bound_never_exceeds_the_true_count(encoder, parts, shift):
    """The first cut lands ``shift`` characters before the end (where a cut word or added token matters most)."""
    tokenizer = PromptTokenizer(encoder.checkpoint.tokenizer, encoder.checkpoint.image_pad_id)
    text = "".join(parts)
    limit = max(1, (len(text) - shift) // 2 - 64)
    true_count = len(encoder.checkpoint.tokenizer(text, add_special_tokens=False)["input_ids"])
    bound = tokenizer.lower_bound(text, limit)
    assert bound is None or limit < bound <= true_count


def _byte_characters() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte's character in a byte-level vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [byte for byte in range(256) if byte not in printable]
    return {**{byte: chr(byte) for byte in printable}, **{byte: chr(256 + n) for n, byte in enumerate(extra)}}


def qwen_like_tokenizer(words: list[str]) -> object:
    """A byte-level BPE with Qwen2's split expression and NFC, whose merges spell each of ``words`` (and
    runs of up to 256 of a word's last symbol) as few tokens: a vocabulary built to make cuts matter."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    characters = _byte_characters()
    vocab = {character: index for index, character in enumerate(characters.values())}
    merges: list[tuple[str, str]] = []

    def add(left: str, right: str) -> str:
        if left + right not in vocab:
            vocab[left + right] = len(vocab)
            merges.append((left, right))
        return left + right

    for word in words:
        symbols = ["".join(characters[b] for b in ch.encode()) for ch in word]
        for symbol in symbols:  # a multi-byte character first becomes one token
            for position in range(2, len(symbol) + 1):
                add(symbol[: position - 1], symbol[position - 1])
        merged = symbols[-1]
        for symbol in reversed(symbols[:-1]):  # then the word from its end: symbol + (rest)
            merged = add(symbol, merged)
        run = symbols[-1]
        for _ in range(8):  # doublings of the last symbol
            run = add(run, run)
    split = json.loads(_tiny_split())
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    return type("Wrapper", (), {"backend_tokenizer": tokenizer})()


def _tiny_split() -> str:
    from rge.testing import build_tiny_tokenizer

    config = json.loads(build_tiny_tokenizer().backend_tokenizer.to_str())
    return json.dumps(config["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"])


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("\n" * 20 + " " * 200 + "\n", ["\n" * 20 + " ", " "]),  # the split expression looks across whitespace
        ("b" * 20 + "a" + "\u0316" * 200 + "\u0301", ["b" * 20 + "\u00e1", "\u0316"]),  # NFC composes across marks
    ],
    ids=["whitespace-run", "combining-marks"],
)
def test_the_lower_bound_holds_where_a_cut_changes_earlier_words(text, words):
    wrapper = qwen_like_tokenizer(words)
    tokenizer = PromptTokenizer(wrapper, image_pad_id=0)
    true_count = len(wrapper.backend_tokenizer.encode(text, add_special_tokens=False).ids)
    assert true_count <= 10  # built so: a cut prompt's first word tokenizes into many more tokens
    bound = tokenizer.lower_bound(text, 10)
    assert bound is None or bound <= true_count
    assert len(tokenizer([text], [None], max_length=10)[0].input_ids) == true_count


def test_a_text_far_over_the_limit_is_refused_after_tokenizing_a_part_of_it(encoder, monkeypatch):
    from tokenizers import Tokenizer

    seen: list[int] = []

    class Counting:
        """The Rust tokenizer, counting the characters its encode methods are given."""

        def __init__(self, backend: Tokenizer) -> None:
            self.backend = backend

        def __getattr__(self, name):
            method = getattr(self.backend, name)
            if not name.startswith("encode"):
                return method

            def counted(first, *args, **kwargs):
                seen.append(len(first) if isinstance(first, str) else sum(map(len, first)))
                return method(first, *args, **kwargs)

            return counted

    from_str = Tokenizer.from_str
    monkeypatch.setattr(Tokenizer, "from_str", lambda text: Counting(from_str(text)))  # the copy rge makes
    tokenizer = PromptTokenizer(encoder.checkpoint.tokenizer, encoder.checkpoint.image_pad_id)
    monkeypatch.undo()
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
    from rge.vision import VisionPreprocessor as Vision

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


def test_a_failed_prefetch_leaves_the_patches_to_be_made_when_taken(encoder):
    from concurrent.futures import ThreadPoolExecutor

    prepared = encoder.checkpoint.vision.prepare(make_test_image(70, 40, seed=8), 0)
    expected = prepared.take_pixel_values()

    def broken(patches):
        raise RuntimeError("pinned memory exhausted")

    with ThreadPoolExecutor(1) as pool:
        prepared.prefetch(pool, broken)
    assert torch.equal(prepared.take_pixel_values(), expected)


def test_a_lazily_opened_pil_image_with_corrupt_data_is_an_input_error(encoder, tmp_path):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    make_test_image(300, 200, seed=4).save(buffer, format="PNG")
    lazy = Image.open(io.BytesIO(buffer.getvalue()[: len(buffer.getvalue()) // 2]))  # header fine, data cut
    with pytest.raises(RGEInputError, match=r"^item 1: PIL image cannot be decoded") as raised:
        encoder.encode_document(["fine", {"text": "cut", "image": lazy}])
    assert raised.value.part == "image"


def test_the_error_raised_is_the_first_bad_items_whatever_went_wrong_with_it(encoder, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    limit = encoder.max_length
    items = ["fine"] * 6
    items[2] = "word " * (limit // 2)  # just over the limit: found by tokenizing it whole
    items[4] = "word " * (limit * 4)  # far over it: found from a part of it, sooner
    with pytest.raises(RGEInputError, match=r"^item 2: prompt of \d+ tokens"):
        encoder.encode_document(items)
    mixed = [{"text": "fine"}, {"text": "word " * (limit // 2)}, {"text": "x", "image": str(broken)}]
    with pytest.raises(RGEInputError, match=r"^item 1: prompt of"):
        encoder.encode_document(mixed)


def test_a_text_over_the_limit_is_refused_by_rge_alone(tiny_path, capfd, caplog):
    """rge's RGEInputError and no warning before it, though transformers warns about the same text when its own
    tokenizer is called on it (called after: it warns once per tokenizer)."""
    caplog.set_level(logging.WARNING, logger="transformers")  # the tests' setting is ERROR
    encoder = load_tiny(tiny_path, "cpu")
    tokenizer = encoder.checkpoint.tokenizer
    text = "word " * (tokenizer.model_max_length + 1)
    capfd.readouterr()
    for reason in (False, True):
        with pytest.raises(RGEInputError, match=r"item 0: prompt of (at least )?\d+ tokens .*exceeds max_length="):
            encoder.encode(text, reason=reason)
    assert capfd.readouterr().err == "" and caplog.messages == []
    tokenizer(text, add_special_tokens=False)
    assert any(message.startswith("Token indices sequence length is longer") for message in caplog.messages)
