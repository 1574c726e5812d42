"""Offline stand-ins for big hub models, built on the spot in a temp directory.

`build_tiny_mst5` makes a miniature of the m-ST5 setup (google/mt5-xxl encoder + the
pkshatech/m-ST5 LoRA adapter) laid out on disk exactly like the hub repos, so tests can
pass the directories to `from_pretrained` and exercise the real loading code:

* base dir: `spiece.model` (a sentencepiece unigram model trained here, mT5-style ids:
  pad=0, eos=1, unk=2, no byte fallback), tokenizer files from `save_pretrained`,
  and a random 2-layer `MT5EncoderModel` saved as safetensors;
* adapter dir: a peft LoRA adapter with m-ST5's shape (r=8, alpha=32, q and v).

Everything is seeded, so two builds give identical files. It takes about a second.
"""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import sentencepiece as spm
import torch

# A few hundred short sentences in en/de/fr/ja. Hand-written seeds plus a small template
# grammar per language; enough for a 500-piece unigram vocab with real subwords.
_SEED_SENTENCES: tuple[str, ...] = (
    "The cat sleeps on the warm windowsill.",
    "I am a dog.",
    "You are a cat.",
    "Parallel sentences are mined from large monolingual corpora.",
    "The weather is nice today, isn't it?",
    "Please send me the report by Friday.",
    "She has been learning Japanese for three years.",
    "Trains in this country are usually on time.",
    "We need more data to train a better model.",
    "He opened the window because it was too hot.",
    "Die Katze schläft auf der warmen Fensterbank.",
    "Ich bin ein Hund.",
    "Du bist eine Katze.",
    "Das Wetter ist heute schön, nicht wahr?",
    "Bitte schicken Sie mir den Bericht bis Freitag.",
    "Sie lernt seit drei Jahren Japanisch.",
    "Die Züge in diesem Land sind meistens pünktlich.",
    "Wir brauchen mehr Daten, um ein besseres Modell zu trainieren.",
    "Er öffnete das Fenster, weil es zu heiß war.",
    "Größere Modelle übersetzen oft besser.",
    "Le chat dort sur le rebord chaud de la fenêtre.",
    "Je suis un chien.",
    "Tu es un chat.",
    "Il fait beau aujourd'hui, n'est-ce pas ?",
    "Envoyez-moi le rapport avant vendredi, s'il vous plaît.",
    "Elle apprend le japonais depuis trois ans.",
    "Les trains de ce pays sont généralement à l'heure.",
    "Nous avons besoin de plus de données pour entraîner un meilleur modèle.",
    "Il a ouvert la fenêtre parce qu'il faisait trop chaud.",
    "Où est la gare ? Ça fait déjà une heure que j'attends.",
    "猫は暖かい窓辺で寝ています。",
    "私は犬です。",
    "あなたは猫です。",
    "今日はいい天気ですね。",
    "金曜日までに報告書を送ってください。",
    "彼女は三年間日本語を勉強しています。",
    "この国の電車はたいてい時間通りです。",
    "より良いモデルを学習するにはもっとデータが必要です。",
    "暑すぎたので彼は窓を開けました。",
    "駅はどこですか。もう一時間も待っています。",
)

_TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "en": (
        ("My brother", "The teacher", "A small child", "Our neighbour", "The old man"),
        ("reads", "buys", "likes", "forgets", "carries"),
        ("a book.", "the newspaper.", "fresh bread.", "a red bicycle.", "two apples."),
    ),
    "de": (
        ("Mein Bruder", "Die Lehrerin", "Ein kleines Kind", "Unser Nachbar", "Der alte Mann"),
        ("liest", "kauft", "mag", "vergisst", "trägt"),
        ("ein Buch.", "die Zeitung.", "frisches Brot.", "ein rotes Fahrrad.", "zwei Äpfel."),
    ),
    "fr": (
        ("Mon frère", "La maîtresse", "Un petit enfant", "Notre voisin", "Le vieil homme"),
        ("lit", "achète", "aime", "oublie", "porte"),
        ("un livre.", "le journal.", "du pain frais.", "un vélo rouge.", "deux pommes."),
    ),
    "ja": (
        ("兄は", "先生は", "小さな子供は", "隣の人は", "おじいさんは"),
        ("本を", "新聞を", "パンを", "赤い自転車を", "りんごを二つ"),
        ("読みます。", "買います。", "好きです。", "忘れました。", "運びます。"),
    ),
}


def training_sentences() -> list[str]:
    """The sentencepiece training corpus: seeds + 4 x 125 template sentences."""
    out = list(_SEED_SENTENCES)
    for lang, (subjects, verbs, objects) in _TEMPLATES.items():
        for s, v, o in itertools.product(subjects, verbs, objects):
            # Japanese is SOV and has no spaces; the template already holds particles.
            out.append(f"{s}{v}{o}" if lang == "ja" else f"{s} {v} {o}")
    return out


def train_spiece(path: Path, vocab_size: int = 500) -> Path:
    """Train a unigram sentencepiece model with mT5's special-id layout; write it to `path`.

    No byte fallback, like mT5's spiece.model: unseen characters become <unk>. With
    character_coverage=1.0 every character of the corpus gets a piece, so the texts the
    tests use (drawn from the same languages) tokenise into real subwords.
    """
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_sentences()),
        model_writer=buf,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        # A tiny corpus may not support the full vocab; take what it supports.
        hard_vocab_limit=False,
        num_threads=1,  # deterministic output
        minloglevel=2,  # quiet
    )
    path.write_bytes(buf.getvalue())
    return path


def _build_tokenizer(base_dir: Path) -> int:
    """Write spiece.model + tokenizer files into base_dir; return the sentencepiece vocab size.

    This is what the hub's mT5 repos hold: spiece.model and a tokenizer_config with
    extra_ids=0. On top we save the converted "fast" tokenizer.json, so both the
    sentencepiece path and the `tokenizers` path load from this directory. (Transformers 5
    has no sentencepiece-backed T5Tokenizer any more; `T5Tokenizer(vocab_file=...)` there
    builds an empty placeholder vocab, while `from_pretrained` converts spiece.model
    properly, so we go through `from_pretrained`.)
    """
    from transformers import AutoTokenizer

    spiece = train_spiece(base_dir / "spiece.model")
    (base_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "T5Tokenizer",
                "extra_ids": 0,
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
            }
        )
    )
    fast = AutoTokenizer.from_pretrained(str(base_dir), use_fast=True)
    fast.save_pretrained(str(base_dir))  # adds tokenizer.json, keeps spiece.model
    return spm.SentencePieceProcessor(model_file=str(spiece)).get_piece_size()


def _build_base_model(
    base_dir: Path, vocab_size: int, seed: int, d_model: int = 64, num_layers: int = 2
) -> None:
    from transformers import MT5Config, MT5EncoderModel

    # mT5-XXL's proportions at any size: d_ff = 2.5 d_model, heads of 64 (16 here).
    d_kv = 16 if d_model <= 64 else 64
    config = MT5Config(
        # mT5 pads the embedding matrix past the tokenizer's vocab (250112 vs 250100);
        # do the same so "vocab size" and "embedding rows" differ here too.
        vocab_size=((vocab_size + 7) // 8) * 8,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=128 if d_model == 64 else d_model * 5 // 2,
        num_layers=num_layers,
        num_heads=d_model // d_kv,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.1,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    model = MT5EncoderModel(config)
    model.save_pretrained(str(base_dir))  # safetensors is the default format


def _build_adapter(base_dir: Path, adapter_dir: Path, seed: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import MT5EncoderModel

    base = MT5EncoderModel.from_pretrained(str(base_dir), dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=32, target_modules=["q", "v"], lora_dropout=0.1)
    model = get_peft_model(base, lora)
    # peft initialises lora_B to zeros, i.e. the adapter starts as a no-op; a test
    # against a no-op adapter would pass even if the adapter were never applied.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    model.save_pretrained(str(adapter_dir))


def build_tiny_mst5(
    root: Path, seed: int = 0, *, d_model: int = 64, num_layers: int = 2
) -> tuple[Path, Path]:
    """Build a tiny m-ST5 look-alike under `root`; return (base_dir, adapter_dir).

    The defaults are the test model (d_model 64, 2 layers); the CPU benchmark asks for a
    larger one (d_model 256, 4 layers) with the same layout.
    """
    root = Path(root)
    base_dir, adapter_dir = root / "tiny-mt5", root / "tiny-mst5-lora"
    base_dir.mkdir(parents=True, exist_ok=True)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = _build_tokenizer(base_dir)
    _build_base_model(base_dir, vocab_size, seed, d_model=d_model, num_layers=num_layers)
    _build_adapter(base_dir, adapter_dir, seed + 1)
    return base_dir, adapter_dir


def mixed_length_sentences(
    spiece_file: Path, n: int, low: int = 5, high: int = 60, seed: int = 0
) -> list[str]:
    """`n` sentences of the tiny model's languages, token counts (EOS included) spread
    evenly over [low, high]: words from the training corpus strung together until the
    sentencepiece model says the sentence is long enough."""
    import random

    sp = spm.SentencePieceProcessor(model_file=str(spiece_file))
    rng = random.Random(seed)
    words = [w for s in training_sentences() for w in s.split()]
    out: list[str] = []
    while len(out) < n:
        target = rng.randint(low, high)
        text = ""
        while True:
            longer = f"{text} {rng.choice(words)}".strip()
            if len(sp.encode(longer)) + 1 > target:
                break
            text = longer
        if text and len(sp.encode(text)) + 1 >= low:
            out.append(text)
    return out
