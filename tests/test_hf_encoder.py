"""HFEncoder against the m-ST5 card's recipe, on a tiny offline m-ST5 look-alike.

The tiny model (tests/tiny_models.py) has m-ST5's structure: an mT5 encoder from a local
directory loaded through `from_pretrained`, a sentencepiece spiece.model, and a LoRA
adapter on q and v with non-zero B, so merging, pooling, batching and tokenisation are
exercised for real. Only the sizes are small.
"""

from __future__ import annotations

import itertools
import pickle
import random
import warnings
from pathlib import Path

import numpy as np
import pytest

from mining.encoders.base import l2_normalise
from mining.encoders.hf import HFEncoder, SentencePieceT5Tokenizer, card_recipe_embeddings

_HAND_WRITTEN = [
    "I am a dog.",
    "You are a cat.",
    "x",
    "Ok",
    "Parallel sentences are mined from large monolingual corpora, one shard at a time.",
    "Die Züge in diesem Land sind meistens pünktlich, außer wenn es schneit.",
    "Où est la gare ? Ça fait déjà une heure que j'attends sous la pluie.",
    "猫は暖かい窓辺で寝ています。",
    "金曜日までに報告書を送ってください。",
    "今日は",
    "Größere Modelle übersetzen oft besser, brauchen aber mehr Speicher.",
    "l'heure d'été",
    # Characters the tiny_mst5 vocab has never seen: they become <unk>, as in mT5.
    "Привет, мир! 🙂",
    "  leading, trailing and   repeated   spaces  ",
    "tab\tand\nnewline",
    "Ｆｕｌｌｗｉｄｔｈ １２３ and ｶﾀｶﾅ (NFKC folds these)",
    "1234567890 3.14 -42",
    "A",
    "Nous avons besoin de plus de données pour entraîner un meilleur modèle.",
    "She has been learning Japanese for three years, and he has been learning German.",
]


def _mixed_sentences() -> list[str]:
    """~40 sentences: the hand-written ones plus seeded concatenations (up to ~150 tokens)."""
    rng = random.Random(1234)
    out = list(_HAND_WRITTEN)
    for k in range(20):
        out.append(" ".join(rng.choice(_HAND_WRITTEN[4:]) for _ in range(1 + k % 7)))
    return out


SENTENCES = _mixed_sentences()

# transformers 5 renamed the gradient-checkpointing API; the card recipe (and peft) still
# use the old names on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:.*checkpointing.*:FutureWarning")


@pytest.fixture(scope="session")
def encoder(tiny_mst5: tuple[Path, Path]) -> HFEncoder:
    base, adapter = tiny_mst5
    return HFEncoder(str(base), adapter=str(adapter), dtype="float32", device="cpu").load()


@pytest.fixture(scope="session")
def vectors(encoder: HFEncoder) -> np.ndarray:
    return encoder.encode(SENTENCES)


def _rowwise_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(l2_normalise(a) * l2_normalise(b), axis=1)


def test_matches_card_recipe_fp32(tiny_mst5: tuple[Path, Path], vectors: np.ndarray) -> None:
    base, adapter = tiny_mst5
    reference = card_recipe_embeddings(str(base), str(adapter), SENTENCES, batch_size=8)
    assert reference.shape == vectors.shape
    assert _rowwise_cos(vectors, reference).min() >= 0.9999
    # Much tighter than the cosine bound: merged vs unmerged LoRA and different padding
    # should only differ by float rounding.
    np.testing.assert_allclose(vectors, l2_normalise(reference), atol=1e-5)


def test_adapter_changes_vectors(tiny_mst5: tuple[Path, Path], vectors: np.ndarray) -> None:
    base, _ = tiny_mst5
    plain = HFEncoder(str(base), dtype="float32", device="cpu").encode(SENTENCES)
    cos = _rowwise_cos(vectors, plain)
    assert cos.min() < 0.99, "the adapter looks like a no-op"
    assert np.mean(cos < 0.9999) > 0.5


def test_bfloat16_close_to_fp32(tiny_mst5: tuple[Path, Path], vectors: np.ndarray) -> None:
    base, adapter = tiny_mst5
    enc = HFEncoder(str(base), adapter=str(adapter), dtype="bfloat16", device="cpu")
    half = enc.encode(SENTENCES)
    assert half.dtype == np.float32
    assert _rowwise_cos(vectors, half).min() >= 0.999


def test_output_in_input_order(encoder: HFEncoder, vectors: np.ndarray) -> None:
    one_by_one = np.concatenate([encoder.encode([s]) for s in SENTENCES])
    np.testing.assert_allclose(vectors, one_by_one, atol=1e-5)
    perm = np.random.default_rng(0).permutation(len(SENTENCES))
    shuffled = encoder.encode([SENTENCES[i] for i in perm])
    np.testing.assert_allclose(shuffled, vectors[perm], atol=1e-5)


def test_batch_tokens_only_changes_speed(tiny_mst5: tuple[Path, Path], vectors: np.ndarray) -> None:
    base, adapter = tiny_mst5
    small = HFEncoder(
        str(base), adapter=str(adapter), dtype="float32", device="cpu", batch_tokens=40
    )
    lengths = np.array(sorted((len(t) for t in small.tokenize(SENTENCES)), reverse=True))
    plan = small.plan_batches(lengths, small.batch_tokens)
    assert len(plan) > 10  # really many batches
    for start, end in plan:
        assert end > start
        assert (end - start) * lengths[start] <= 40 or end - start == 1
    np.testing.assert_allclose(small.encode(SENTENCES), vectors, atol=1e-5)
    big = HFEncoder(
        str(base), adapter=str(adapter), dtype="float32", device="cpu", batch_tokens=1 << 20
    )
    np.testing.assert_allclose(big.encode(SENTENCES), vectors, atol=1e-5)


def test_truncation_counter(tiny_mst5: tuple[Path, Path], encoder: HFEncoder) -> None:
    base, adapter = tiny_mst5
    full = encoder.tokenize(SENTENCES)
    expected = sum(len(t) > 8 for t in full)
    assert 0 < expected < len(SENTENCES)

    enc = HFEncoder(str(base), adapter=str(adapter), dtype="float32", device="cpu", max_tokens=8)
    assert enc.truncated == 0
    ids = enc.tokenize(SENTENCES)
    assert enc.truncated == expected
    eos = enc.tokenizer.eos_token_id
    for cut, whole in zip(ids, full, strict=True):
        # Cut as transformers cuts: the first max_tokens - 1 pieces, then EOS.
        assert cut == (whole if len(whole) <= 8 else [*whole[:7], eos])
    vecs = enc.encode(SENTENCES)
    assert enc.truncated == 2 * expected  # cumulative over calls
    # Sentences that fit are untouched by the limit.
    short = [i for i, t in enumerate(full) if len(t) <= 8]
    np.testing.assert_allclose(
        vecs[short], encoder.encode([SENTENCES[i] for i in short]), atol=1e-5
    )


def test_empty_input(encoder: HFEncoder) -> None:
    out = encoder.encode([])
    assert out.shape == (0, encoder.dim)
    assert out.dtype == np.float32


def test_rows_unit_norm(encoder: HFEncoder, vectors: np.ndarray) -> None:
    assert vectors.shape == (len(SENTENCES), encoder.dim)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cls = HFEncoder(encoder.model_name, adapter=encoder.adapter, pooling="cls", device="cpu")
    cls_vecs = cls.encode(SENTENCES)
    np.testing.assert_allclose(np.linalg.norm(cls_vecs, axis=1), 1.0, atol=1e-5)
    assert _rowwise_cos(cls_vecs, vectors).min() < 0.99  # a different pooling really ran


def test_construction_is_lazy_and_picklable(tiny_mst5: tuple[Path, Path]) -> None:
    from mining.encoders.base import Encoder

    base, adapter = tiny_mst5
    enc = HFEncoder(str(base), adapter=str(adapter), device="cpu")
    assert enc.model is None and enc.tokenizer is None
    assert enc.dim == 64
    assert isinstance(enc, Encoder)
    clone = pickle.loads(pickle.dumps(enc))
    assert clone.model is None and clone.dim == 64
    first = clone.encode(SENTENCES[:3])
    # A loaded encoder pickles without its weights and reloads on demand.
    again = pickle.loads(pickle.dumps(clone))
    assert again.model is None
    np.testing.assert_allclose(again.encode(SENTENCES[:3]), first, atol=1e-6)


def test_float16_warns_for_t5(tiny_mst5: tuple[Path, Path]) -> None:
    base, _ = tiny_mst5
    with pytest.warns(UserWarning, match="float16"):
        HFEncoder(str(base), dtype="float16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HFEncoder(str(base), dtype="bfloat16")


def test_sentencepiece_and_fast_tokenizers_agree(
    tiny_mst5: tuple[Path, Path], encoder: HFEncoder
) -> None:
    """The slow (sentencepiece) path, used by default and by the card recipe, vs the
    transformers 5 `tokenizers` conversion, on the test texts and on special tokens."""
    base, _ = tiny_mst5
    assert isinstance(encoder.tokenizer, SentencePieceT5Tokenizer)
    fast = HFEncoder(str(base), tokenizer="fast", device="cpu")
    fast.load()
    assert getattr(fast.tokenizer, "is_fast", False)
    texts = [*SENTENCES, "a </s> b", "x<unk>y<pad>", "", " "]
    assert encoder.tokenize(texts) == fast.tokenize(texts)
    cut_slow = encoder.tokenizer(texts, truncation=True, max_length=5)["input_ids"]
    cut_fast = fast.tokenizer(texts, truncation=True, max_length=5)["input_ids"]
    assert cut_slow == cut_fast


def test_plan_batches_fills_budget_within_padding_cap() -> None:
    rng = np.random.default_rng(0)
    lengths = np.sort(rng.integers(3, 200, size=5000))[::-1]
    plan = HFEncoder.plan_batches(lengths, 4096)
    assert plan[0][0] == 0 and plan[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(plan))
    padded = 0
    for start, end in plan:
        width, count = lengths[start], end - start
        assert count * width <= 4096 or count == 1
        assert count * width - lengths[start:end].sum() <= 0.05 * count * width
        padded += count * width
    assert 1 - lengths.sum() / padded < 0.05
    # A sentence longer than the budget still gets a batch of its own.
    assert HFEncoder.plan_batches(np.array([9000, 10, 10]), 4096) == [(0, 1), (1, 3)]


def test_out_of_memory_halves_the_batch_and_goes_on(
    tiny_mst5: tuple[Path, Path], vectors: np.ndarray
) -> None:
    import torch

    base, adapter = tiny_mst5
    enc = HFEncoder(str(base), adapter=str(adapter), dtype="float32", device="cpu").load()
    forward = enc.model.forward
    seen: list[int] = []

    def small_gpu(*args, input_ids, **kwargs):
        seen.append(input_ids.numel())
        if input_ids.numel() > 300:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(*args, input_ids=input_ids, **kwargs)

    enc.model.forward = small_gpu
    np.testing.assert_allclose(enc.encode(SENTENCES), vectors, atol=1e-5)
    assert enc.oom_halvings >= 1
    assert enc._budget <= 300  # the halved budget holds for later calls
    assert max(seen[enc.oom_halvings :]) <= 300
    assert enc.stats()["oom_halvings"] == enc.oom_halvings

    def no_gpu(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    enc.model.forward = no_gpu
    with pytest.raises(RuntimeError, match="single sentence"):
        enc.encode(["one sentence"])


def test_fast_tokenizer_is_checked_against_sentencepiece(
    tiny_mst5: tuple[Path, Path], encoder: HFEncoder
) -> None:
    from mining.encoders.hf import TOKENIZER_SAMPLE, check_tokenizers_agree

    base, _ = tiny_mst5
    fast = HFEncoder(str(base), tokenizer="fast", device="cpu").load().tokenizer
    check_tokenizers_agree(encoder.tokenizer, fast, TOKENIZER_SAMPLE)  # agrees: no error

    class OffByOne:
        def __call__(self, texts, **kwargs):
            out = fast(texts, **kwargs)
            return {
                "input_ids": [[t + (k == 4) for t in ids] for k, ids in enumerate(out["input_ids"])]
            }

    with pytest.raises(ValueError, match="Привет"):
        check_tokenizers_agree(encoder.tokenizer, OffByOne(), TOKENIZER_SAMPLE)


def test_attention_kernels_agree(tiny_mst5: tuple[Path, Path], vectors: np.ndarray) -> None:
    base, adapter = tiny_mst5
    eager = HFEncoder(str(base), adapter=str(adapter), dtype="float32", attention="eager")
    assert eager.load().model.config._attn_implementation == "eager"
    np.testing.assert_allclose(eager.encode(SENTENCES), vectors, atol=1e-5)


def test_fp8_runs_every_block_matmul_in_fp8(tiny_mst5: tuple[Path, Path]) -> None:
    """fp8 is not a spec option yet: on random weights it stays below the 0.999 cosine
    the issue asks for (0.988 here, 0.93 on the benchmark's d_model 256 model), and
    whether real m-ST5 weights do better needs a GPU run on them. This checks the
    mechanics: every block matmul replaced, vectors still close to bf16's."""
    base, adapter = tiny_mst5
    bf16 = HFEncoder(str(base), adapter=str(adapter), dtype="bfloat16", device="cpu")
    fp8 = HFEncoder(str(base), adapter=str(adapter), dtype="bfloat16", device="cpu", fp8=True)
    fp8.load()
    kinds = {type(m).__name__ for m in fp8.model.modules()}
    assert "Fp8Linear" in kinds and "Linear" not in kinds
    assert _rowwise_cos(fp8.encode(SENTENCES), bf16.encode(SENTENCES)).min() >= 0.98


def test_from_model_wraps_a_model_in_memory(encoder: HFEncoder, vectors: np.ndarray) -> None:
    wrapped = HFEncoder.from_model(encoder.model, encoder.tokenizer)
    np.testing.assert_allclose(wrapped.encode(SENTENCES), vectors, atol=1e-6)
    ids_only = HFEncoder.from_model(encoder.model, pad_token_id=0)
    prepared = ids_only.prepare_ids(encoder.tokenize(SENTENCES))
    half = ids_only.encode_prepared(prepared)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), vectors, atol=2e-3)
    with pytest.raises(ValueError, match="more than max_tokens"):
        ids_only.prepare_ids([[5] * 600])
