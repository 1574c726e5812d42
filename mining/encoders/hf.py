"""Hugging Face transformer encoders, m-ST5 (mT5-XXL encoder + LoRA) first among them.

`HFEncoder` is the fast inference path: eval mode, `torch.inference_mode`, LoRA merged
into the base weights, bf16 on GPU, batches filled to a token budget from length-sorted
sentences, pinned-memory copies, and vectors that stay on the GPU until a whole chunk is
done. `card_recipe_embeddings` is the slow reference: the pkshatech/m-ST5 model card's
snippet run as written (fp32, unmerged PeftModel, gradient checkpointing switched on,
plain `padding=True` batches). Parity tests and benchmarks compare the two.

What the m-ST5 card does (README at hub revision 41abffd): load `MT5EncoderModel` from
google/mt5-xxl, call `enable_input_require_grads()` and `gradient_checkpointing_enable()`,
wrap with `PeftModel.from_pretrained(model, "pkshatech/m-ST5")` (not merged), load the
tokenizer with `use_fast=False`, call `model.eval()`, tokenise with `padding=True,
truncation=True`, zero the hidden states at padded positions and divide the sum by the
number of real tokens (EOS included). It does not L2-normalise; cosine is applied later,
so normalising here changes no similarity.

The encoding work is split in two so that tokenisation runs ahead of the GPU: `prepare`
(CPU only, no shared state, safe in a background thread) turns texts into token ids, and
`encode_prepared` runs the model. `encode` is the two in a row.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

    from mining.config import EncoderSection

log = logging.getLogger(__name__)

Pooling = Literal["mean", "cls"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
TokenizerKind = Literal["auto", "sentencepiece", "fast"]
Attention = Literal["auto", "sdpa", "eager"]

# Encoder-only classes for the T5 family: `AutoModel` would build the decoder as well,
# doubling memory for mT5-XXL, and the decoder's weights are never used.
T5_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}

# Token budgets per forward pass when the spec leaves it to the device (batch_tokens =
# 0). A GPU wants large matmuls; on CPU, batches whose activations outgrow the caches
# ran 1.8x slower (bench/README.md: 2048 vs 16384 tokens, fp32, 2 cores).
GPU_BATCH_TOKENS = 16384
CPU_BATCH_TOKENS = 2048

# The largest padded share a batch may have. Sorting by length makes most batches far
# tighter; the cap matters for the short sentences, where one token is a large share.
MAX_PADDING = 0.05

# Texts on which a `tokenizers` conversion must give sentencepiece's ids before it is
# used in its place: many scripts, normalisation (NFKC, full width, ligatures, combining
# marks), odd whitespace, special-token strings inside text, empty input.
TOKENIZER_SAMPLE: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Größere Modelle übersetzen oft besser; Straße, Maß und Fuß.",
    "Où est la gare ? Ça fait déjà une heure « qu'on » attend…",
    "¿Dónde está la biblioteca? ¡Qué día tan bonito!",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "Καλημέρα κόσμε, τι κάνεις;",
    "مرحبا بالعالم، كيف حالك؟",
    "שלום עולם, מה שלומך?",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "আমি বাংলায় গান গাই।",
    "สวัสดีชาวโลก ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "猫は暖かい窓辺で寝ています。",
    "我们需要更多的数据来训练更好的模型。",
    "안녕하세요, 세계! 한국어 문장입니다.",
    "Tiếng Việt có dấu: Đường phố Hà Nội.",
    "İstanbul'da ılık bir gün; şişli çığ öğütücü.",
    "Ｆｕｌｌｗｉｄｔｈ １２３ ｶﾀｶﾅ ﬁ ligature ½ ①",
    "e\u0301 combining accent vs é precomposed",
    "  leading, trailing and   repeated   spaces  ",
    "tab\tand\nnewline\r\nwindows",
    "emoji 🙂👍🏽 and a ZWJ family 👩\u200d👩\u200d👧",
    "a </s> b <pad> c <unk> d",
    "URL https://example.org/a?b=c&d=e and mail a.b@example.com",
    "1234567890 3.14159 -42 1e-9 $5.00 €10 ¥100",
    "\u00a0non-breaking\u2003em space\u200bzero width",
    "",
    " ",
    "x",
)


# --------------------------------------------------------------------------- loading


def load_config(model: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The model's config alone: a small JSON file, no weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)


def _transformers_at_least(version: str) -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version(version)


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # `torch_dtype` was renamed `dtype` in transformers 4.56; the project allows >= 4.46.
    key = "dtype" if _transformers_at_least("4.56") else "torch_dtype"
    return {key: dtype}


def _safe_load_kwargs() -> dict[str, Any]:
    """from_pretrained arguments that keep a checkpoint from running code.

    Safetensors are preferred where the repo has them; a `.bin` is then read with
    `torch.load(weights_only=True)`, which rebuilds tensors and refuses any other object
    in the pickle. transformers has defaulted to that since 4.50; we ask for it anyway.
    """
    kwargs: dict[str, Any] = {"use_safetensors": None}
    if _transformers_at_least("4.50"):
        kwargs["weights_only"] = True
    return kwargs


def _model_class(config: Any) -> Any:
    import transformers

    name = T5_ENCODERS.get(config.model_type)
    return getattr(transformers, name) if name else transformers.AutoModel


def _hidden_size(config: Any) -> int:
    if config.model_type in T5_ENCODERS:
        return int(config.d_model)
    return int(config.hidden_size)


class SentencePieceT5Tokenizer:
    """T5-family tokenisation straight from spiece.model, as transformers 4.x's slow
    `T5Tokenizer` (legacy mode, the default for the mT5 checkpoints) did it.

    The m-ST5 card asks for `use_fast=False`. Transformers 5 ignores that flag and always
    builds a `tokenizers` Unigram converted from spiece.model. On ordinary text the two
    agree, but the conversion is a re-implementation (normalizer, whitespace splitting),
    so where the slow tokenizer is asked for we run sentencepiece itself. It is also the
    faster of the two here: one multi-threaded C++ call that releases the GIL (32.7k vs
    16.4k sentences/s for `tokenizers`' own batch call on 2 cores, see bench/README.md).

    Behaviour copied from the slow tokenizer: special-token strings in the text (`</s>`,
    `<pad>`, `<extra_id_3>`, ...) are split out first and mapped to their ids, every other
    chunk goes through sentencepiece on its own, then `</s>` is appended unless the ids
    already end with it; truncation keeps the first `max_length - 1` pieces + `</s>`.
    Only the call forms this module uses are supported.
    """

    is_fast = False
    padding_side = "right"

    def __init__(
        self,
        spiece_file: str,
        *,
        special_tokens: Mapping[str, int],
        pad_token_id: int,
        eos_token_id: int,
        unk_token_id: int,
        model_max_length: int,
    ) -> None:
        import sentencepiece as spm

        self.spiece_file = spiece_file
        self.sp = spm.SentencePieceProcessor(model_file=spiece_file)
        self.special_tokens = dict(special_tokens)
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.unk_token_id = unk_token_id
        self.model_max_length = model_max_length
        # Longest first, so "<extra_id_10>" wins over a hypothetical "<extra_id_1>" prefix.
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = (
            re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None
        )

    @classmethod
    def from_hf(cls, spiece_file: str, hf_tokenizer: Any) -> SentencePieceT5Tokenizer:
        """Take special tokens and limits from an already loaded HF tokenizer of the repo."""
        specials = {
            t: hf_tokenizer.convert_tokens_to_ids(t) for t in hf_tokenizer.all_special_tokens
        }
        return cls(
            spiece_file,
            special_tokens=specials,
            pad_token_id=hf_tokenizer.pad_token_id,
            eos_token_id=hf_tokenizer.eos_token_id,
            unk_token_id=hf_tokenizer.unk_token_id,
            model_max_length=hf_tokenizer.model_max_length,
        )

    def __getstate__(self) -> dict[str, Any]:
        # SentencePieceProcessor does not pickle; rebuild it from the file.
        state = self.__dict__.copy()
        del state["sp"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import sentencepiece as spm

        self.__dict__.update(state)
        self.sp = spm.SentencePieceProcessor(model_file=self.spiece_file)

    def _pieces(self, texts: list[str]) -> list[list[int]]:
        plain = list(range(len(texts)))
        out: list[list[int]] = [[] for _ in texts]
        if self._special_re is not None:
            plain = [i for i, t in enumerate(texts) if not self._special_re.search(t)]
            for i in sorted(set(range(len(texts))) - set(plain)):
                for k, chunk in enumerate(self._special_re.split(texts[i])):
                    if k % 2:  # odd chunks are the captured special tokens
                        out[i].append(self.special_tokens[chunk])
                    elif chunk:
                        out[i].extend(self.sp.encode(chunk))
        if plain:
            # One multi-threaded C++ call for the (usual) texts without special tokens.
            encoded = self.sp.encode([texts[i] for i in plain], num_threads=os.cpu_count() or 1)
            for i, ids in zip(plain, encoded, strict=True):
                out[i] = ids
        return out

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        **_: Any,
    ) -> dict[str, Any]:
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        ids = self._pieces(batch)
        limit = (max_length or self.model_max_length) if truncation else None
        n_special = 1 if add_special_tokens else 0
        for k, seq in enumerate(ids):
            if limit is not None and len(seq) + n_special > limit:
                seq = seq[: max(limit - n_special, 0)]
            if add_special_tokens and not (seq and seq[-1] == self.eos_token_id):
                seq = [*seq, self.eos_token_id]
            ids[k] = seq
        masks = [[1] * len(seq) for seq in ids]
        if padding:
            width = max((len(seq) for seq in ids), default=0)
            masks = [m + [0] * (width - len(m)) for m in masks]
            ids = [seq + [self.pad_token_id] * (width - len(seq)) for seq in ids]
        if return_tensors == "pt":
            import torch

            return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(masks)}
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r} is not supported")
        if single:
            return {"input_ids": ids[0], "attention_mask": masks[0]}
        return {"input_ids": ids, "attention_mask": masks}


def load_tokenizer(
    model: str,
    *,
    use_fast: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
    config: Any = None,
) -> Any:
    """The repo's tokenizer; with use_fast=False a sentencepiece-backed one where possible."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        model, use_fast=use_fast, revision=revision, trust_remote_code=trust_remote_code
    )
    if use_fast or not getattr(tok, "is_fast", False):
        return tok  # transformers 4.x honours use_fast=False itself
    if config is None:
        config = load_config(model, revision=revision, trust_remote_code=trust_remote_code)
    if config.model_type in T5_ENCODERS:
        spiece = _spiece_file(model, revision)
        if spiece is not None:
            return SentencePieceT5Tokenizer.from_hf(spiece, tok)
    log.info("%s: no sentencepiece-backed tokenizer available; using the fast one", model)
    return tok


def _spiece_file(model: str, revision: str | None) -> str | None:
    from transformers.utils import cached_file

    return cached_file(
        model, "spiece.model", revision=revision, _raise_exceptions_for_missing_entries=False
    )


def check_tokenizers_agree(
    reference: Any, candidate: Any, texts: Sequence[str] = TOKENIZER_SAMPLE
) -> None:
    """Raise ValueError naming the first text on which the two tokenizers' ids differ.

    Compared with and without truncation (at 8 tokens), since truncation has its own
    rule for where EOS goes.
    """
    for truncation in (False, True):
        options: dict[str, Any] = {"truncation": truncation, "verbose": False}
        if truncation:
            options["max_length"] = 8
        want = reference(list(texts), **options)["input_ids"]
        got = candidate(list(texts), **options)["input_ids"]
        for text, a, b in zip(texts, want, got, strict=True):
            if list(a) != list(b):
                raise ValueError(
                    f"the fast tokenizer gives {list(b)[:12]} where sentencepiece gives "
                    f"{list(a)[:12]} for {text!r} (truncation={truncation}); "
                    "use encoder.tokenizer = 'sentencepiece'"
                )


def _cast(model: Any, dtype: torch.dtype) -> Any:
    """`model.to(dtype)`, keeping the modules transformers itself keeps in fp32.

    Loading with `dtype=float16` leaves T5's `wo` in fp32 (`_keep_in_fp32_modules`);
    a plain `.to(float16)` after merging the adapter would undo that and overflow.
    """
    import torch

    model = model.to(dtype)
    keep: set[str] = set()
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if keep:
        for name, module in model.named_modules():
            if keep & set(name.split(".")):
                module.float()
    return model


# --------------------------------------------------------------------------- fusion


def fuse_gelu(model: Any) -> int:
    """Swap transformers' NewGELUActivation for torch's fused tanh GELU; return how many.

    T5's `gelu_new` is the tanh approximation written as seven tensor operations, each a
    pass over the largest activations of a block (tokens x d_ff); `F.gelu(approximate=
    "tanh")` is the same function in one kernel, computed in fp32 inside, so it rounds
    once rather than seven times.
    """
    import torch
    import torch.nn.functional as F

    class TanhGELU(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.gelu(x, approximate="tanh")

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "NewGELUActivation":
                setattr(parent, name, TanhGELU())
                replaced += 1
    return replaced


# --------------------------------------------------------------------------- fp8


def _fp8_linear_class() -> type:
    import torch

    class Fp8Linear(torch.nn.Module):
        """`x @ W.T` with x and W in float8 e4m3 and row-wise scales: one per output
        channel of W (fixed), one per token of x (computed on the fly), fp32 accumulation
        in `torch._scaled_mm`, output in x's dtype. Hopper's fp8 tensor cores run this at
        twice the bf16 rate; the row-wise scales keep T5's large activations in range.
        """

        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            weight = linear.weight.detach().float()
            scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 448.0
            # Clamped: whether a float -> e4m3fn cast saturates or gives NaN past 448
            # differs between kernels.
            quantised = (weight / scale).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)
            self.register_buffer("weight_fp8", quantised)
            self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out)
            self.out_features, self.in_features = weight.shape
            # T5's feed-forward block casts its input to `wo.weight.dtype` before `wo`; an
            # empty tensor of the compute dtype keeps that cast a no-op.
            self.weight = torch.empty(0, dtype=linear.weight.dtype, device=weight.device)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rows = x.reshape(-1, self.in_features)
            # The scale rounded to x's dtype first, so that quantising (in x's dtype) and
            # dequantising (in fp32, inside _scaled_mm) use the same number.
            amax = rows.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12)
            scale = (amax / 448.0).to(rows.dtype).float()
            quantised = (rows / scale.to(rows.dtype)).clamp_(-448.0, 448.0)
            quantised = quantised.to(torch.float8_e4m3fn)
            out = torch._scaled_mm(
                quantised,
                self.weight_fp8.t(),  # column-major (in, out), as _scaled_mm wants
                scale_a=scale,
                scale_b=self.weight_scale,
                out_dtype=x.dtype,
            )
            return out.reshape(*x.shape[:-1], self.out_features)

    return Fp8Linear


def to_fp8(model: Any) -> int:
    """Replace the linear layers of the transformer blocks by fp8 ones; return how many.

    Embeddings, norms and pooling stay in the model's dtype. A layer whose sizes are not
    multiples of 16 (a _scaled_mm requirement) is left as it is.
    """
    import torch

    fp8_linear = _fp8_linear_class()
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (
                isinstance(child, torch.nn.Linear)
                and child.bias is None
                and child.in_features % 16 == 0
                and child.out_features % 16 == 0
            ):
                setattr(parent, name, fp8_linear(child))
                replaced += 1
    return replaced


# --------------------------------------------------------------------------- encoder


@dataclass
class Prepared:
    """Token ids of one chunk of texts, ready for `HFEncoder.encode_prepared`.

    All ids in one flat array, so a batch is gathered with one numpy indexing operation
    rather than a Python loop over sentences.
    """

    flat: np.ndarray  # int64, every text's ids one after another
    offsets: np.ndarray  # int64 (n + 1,): text i is flat[offsets[i]:offsets[i + 1]]
    truncated: int = 0  # texts cut at max_tokens

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


class HFEncoder:
    """Sentence vectors from a transformers encoder (optionally + a peft LoRA adapter).

    Construction reads only the config (for `dim`); weights load on the first `encode`
    or an explicit `load()`, so an encoder can be built on a login node and pickled to
    workers. Pickling drops loaded weights.

    Counters (`stats()`): texts truncated, real and padded tokens, batches, and how often
    a CUDA out-of-memory error halved the batch. They add up over all calls.
    """

    def __init__(
        self,
        model: str,
        *,
        adapter: str | None = None,
        pooling: Pooling = "mean",
        dtype: DType = "auto",
        device: str = "auto",
        max_tokens: int = 512,
        batch_tokens: int = 0,
        trust_remote_code: bool = False,
        revision: str | None = None,
        tokenizer: TokenizerKind = "auto",
        attention: Attention = "auto",
        compile: bool = False,
        fp8: bool = False,
    ) -> None:
        self._set_options(
            pooling=pooling,
            dtype=dtype,
            device=device,
            max_tokens=max_tokens,
            batch_tokens=batch_tokens,
            tokenizer=tokenizer,
            attention=attention,
            compile=compile,
            fp8=fp8,
        )
        self.model_name = str(model)
        self.adapter = str(adapter) if adapter is not None else None
        self.trust_remote_code = trust_remote_code
        self.revision = revision
        self._set_config(
            load_config(self.model_name, revision=revision, trust_remote_code=trust_remote_code)
        )
        if dtype == "float16" and self.is_t5:
            warnings.warn(
                "float16 with a T5-family model: T5 activations overflow fp16, so transformers "
                "keeps the `wo` projections in fp32 (slower, more memory); bfloat16 is the "
                "safe half precision for T5.",
                stacklevel=2,
            )

    @classmethod
    def from_section(cls, cfg: EncoderSection, resolve: Any = str) -> HFEncoder:
        """The encoder an `[encoder]` section with kind = "hf" describes.

        `resolve` turns the spec's model and adapter references into what from_pretrained
        takes (a local path resolved against the spec's folder, or a hub id as it is).
        """
        return cls(
            resolve(cfg.model),
            adapter=resolve(cfg.adapter) if cfg.adapter else None,
            pooling=cfg.pooling,
            dtype=cfg.dtype,
            device=cfg.device,
            max_tokens=cfg.max_tokens,
            batch_tokens=cfg.batch_tokens,
            trust_remote_code=cfg.trust_remote_code,
            revision=cfg.revision or None,
            tokenizer=cfg.tokenizer,
            attention=cfg.attention,
            compile=cfg.compile,
        )

    @classmethod
    def from_model(
        cls,
        model: Any,
        tokenizer: Any = None,
        *,
        pad_token_id: int | None = None,
        pooling: Pooling = "mean",
        max_tokens: int = 512,
        batch_tokens: int = 0,
        attention: Attention = "auto",
        compile: bool = False,
        fp8: bool = False,
    ) -> HFEncoder:
        """Wrap a model already in memory, e.g. a benchmark's randomly initialised mT5-XXL.

        The model is used in its own dtype and on its own device (no adapter merge, no
        cast); eval mode, attention choice, fp8 and compile apply as in `load()`. Without a
        tokenizer only `prepare_ids` works, and `pad_token_id` says what to pad with.
        """
        import torch

        self = cls.__new__(cls)
        param = next(model.parameters())
        self._set_options(
            pooling=pooling,
            dtype="auto",
            device=str(param.device),
            max_tokens=max_tokens,
            batch_tokens=batch_tokens,
            tokenizer="auto",
            attention=attention,
            compile=compile,
            fp8=fp8,
        )
        self.model_name = getattr(model.config, "_name_or_path", "") or "<in memory>"
        self.adapter = None
        self.trust_remote_code = False
        self.revision = None
        self._set_config(model.config)
        self.tokenizer = tokenizer
        floating = param.dtype if param.is_floating_point() else torch.float32
        self._install(model, param.device, floating)
        if pad_token_id is not None:
            self._pad_id = int(pad_token_id)
        return self

    def _set_options(
        self,
        *,
        pooling: Pooling,
        dtype: DType,
        device: str,
        max_tokens: int,
        batch_tokens: int,
        tokenizer: TokenizerKind,
        attention: Attention,
        compile: bool,
        fp8: bool,
    ) -> None:
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', not {pooling!r}")
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto/float32/bfloat16/float16, not {dtype!r}")
        if tokenizer not in ("auto", "sentencepiece", "fast"):
            raise ValueError(f"tokenizer must be auto/sentencepiece/fast, not {tokenizer!r}")
        if attention not in ("auto", "sdpa", "eager"):
            raise ValueError(f"attention must be auto/sdpa/eager, not {attention!r}")
        if max_tokens < 1 or batch_tokens < 0:
            raise ValueError("max_tokens must be >= 1 and batch_tokens >= 0 (0: by device)")
        self.pooling: Pooling = pooling
        self.dtype_name: DType = dtype
        self.device_name = device
        self.max_tokens = max_tokens
        self.batch_tokens = batch_tokens
        self.tokenizer_kind: TokenizerKind = tokenizer
        self.attention: Attention = attention
        self.compile = compile
        self.fp8 = fp8
        # The token budget in force: batch_tokens (or the device's, once the device is
        # known) until an out-of-memory error halves it.
        self._budget = batch_tokens or CPU_BATCH_TOKENS
        self.truncated = 0
        self.tokens = 0
        self.padded_tokens = 0
        self.batches = 0
        self.oom_halvings = 0
        self.model: Any = None
        self.tokenizer: Any = None
        self.device: torch.device | None = None
        self.torch_dtype: torch.dtype | None = None
        self._pad_id = 0
        self._load_lock = threading.Lock()

    def _set_config(self, config: Any) -> None:
        self.config = config
        self.is_t5 = config.model_type in T5_ENCODERS
        self.dim: int = _hidden_size(config)
        self._vocab_rows = int(config.vocab_size)

    # -- lifecycle

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["model"] = None
        state["tokenizer"] = None
        state["device"] = None
        state["torch_dtype"] = None
        del state["_load_lock"]  # locks do not pickle
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._load_lock = threading.Lock()

    def stats(self) -> dict[str, int]:
        return {
            "truncated": self.truncated,
            "tokens": self.tokens,
            "padded_tokens": self.padded_tokens,
            "batches": self.batches,
            "oom_halvings": self.oom_halvings,
        }

    def _resolve_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        import torch

        if self.device_name == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(self.device_name)
        if self.dtype_name == "auto":
            # bf16 on a GPU that has it: half the memory and tensor-core speed, with fp32's
            # exponent range (T5 overflows fp16). On CPU, bf16 matmuls are often slower.
            bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
            dtype = torch.bfloat16 if bf16 else torch.float32
        else:
            dtype = getattr(torch, self.dtype_name)
        return device, dtype

    def load(self) -> HFEncoder:
        """Load tokenizer and weights now (idempotent, thread-safe)."""
        with self._load_lock:
            if self.model is None:
                self._load()
        return self

    def _load(self) -> None:
        import torch

        device, dtype = self._resolve_device_dtype()
        self.tokenizer = self._load_tokenizer()
        # With an adapter, load and merge in fp32 and cast afterwards: merging into bf16
        # weights would round twice (checkpoint -> bf16, then bf16 + delta -> bf16).
        # Costs fp32 host memory while loading (about 23 GB for the mT5-XXL encoder);
        # `mining model export` does this once, and embed tasks load its bf16 files.
        load_dtype = torch.float32 if self.adapter else dtype
        extra: dict[str, Any] = {}
        if self.attention != "auto":
            extra["attn_implementation"] = self.attention
        model = _model_class(self.config).from_pretrained(
            self.model_name,
            config=self.config,
            revision=self.revision,
            trust_remote_code=self.trust_remote_code,
            **_safe_load_kwargs(),
            **_dtype_kwarg(load_dtype),
            **extra,
        )
        if self.adapter:
            from peft import PeftModel

            # Merging folds B @ A * alpha / r into q and v: the same function as the
            # unmerged adapter, with no extra matmuls per layer at inference time.
            model = PeftModel.from_pretrained(model, self.adapter).merge_and_unload()
        if model.dtype != dtype:
            model = _cast(model, dtype)
        self._install(model, device, dtype)

    def _load_tokenizer(self) -> Any:
        kind = self.tokenizer_kind
        if kind == "auto":
            # The card's own tokenizer where the repo has it, and the fastest here.
            return load_tokenizer(
                self.model_name,
                use_fast=False,
                revision=self.revision,
                trust_remote_code=self.trust_remote_code,
                config=self.config,
            )
        fast = load_tokenizer(
            self.model_name,
            use_fast=True,
            revision=self.revision,
            trust_remote_code=self.trust_remote_code,
            config=self.config,
        )
        spiece = _spiece_file(self.model_name, self.revision) if self.is_t5 else None
        if kind == "sentencepiece":
            if spiece is None:
                raise ValueError(
                    f"{self.model_name}: encoder.tokenizer = 'sentencepiece' needs a "
                    "spiece.model in the repo, and it has none"
                )
            return SentencePieceT5Tokenizer.from_hf(spiece, fast)
        if spiece is not None:
            # A converted tokenizer is only used where it has shown it gives the ids the
            # model was trained with.
            check_tokenizers_agree(SentencePieceT5Tokenizer.from_hf(spiece, fast), fast)
        return fast

    def _install(self, model: Any, device: torch.device, dtype: torch.dtype) -> None:
        import torch

        if self.attention != "auto" and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(self.attention)
        model.eval()  # dropout off: deterministic vectors
        model.requires_grad_(False)
        fuse_gelu(model)
        model = model.to(device)
        if self.fp8:
            replaced = to_fp8(model)
            log.info("fp8: %d linear layers now run in float8 e4m3", replaced)
        if self.compile:
            # dynamic: batch shapes vary (count x width); one graph for all of them rather
            # than a recompilation per shape.
            model = torch.compile(model, dynamic=True)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.config, "pad_token_id", None)
        self._pad_id = int(pad) if pad is not None else 0
        if not self.batch_tokens:
            self._budget = GPU_BATCH_TOKENS if device.type == "cuda" else CPU_BATCH_TOKENS
        self.model = model
        self.device, self.torch_dtype = device, dtype

    # -- tokenisation (CPU; safe to run in another thread than encode_prepared)

    def _tokenize(self, texts: list[str]) -> tuple[list[list[int]], int]:
        tok = self.tokenizer
        ids: list[list[int]] = tok(texts, truncation=False, verbose=False)["input_ids"]
        # Tokenise everything once without truncation, so we see who is too long; only
        # those (rare in sentence mining) go through the tokenizer again with truncation,
        # which keeps the tokenizer's own rule for where special tokens go.
        long = [i for i, seq in enumerate(ids) if len(seq) > self.max_tokens]
        if long:
            cut = tok(
                [texts[i] for i in long], truncation=True, max_length=self.max_tokens, verbose=False
            )["input_ids"]
            for i, seq in zip(long, cut, strict=True):
                ids[i] = list(seq)
        return ids, len(long)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, cut at max_tokens; adds the number cut to `self.truncated`."""
        self.load()
        ids, truncated = self._tokenize(list(texts))
        self.truncated += truncated
        return [list(seq) for seq in self._clip_vocab(ids)]

    def _clip_vocab(self, ids: list[list[int]]) -> list[list[int]]:
        # An id past the embedding matrix (e.g. mT5's `<extra_id_0>`, numbered above the
        # 250112 rows) would crash the whole batch with an index error; map it to <unk>.
        rows = self._vocab_rows
        if ids and max(max(seq, default=0) for seq in ids) >= rows:
            unk = self.tokenizer.unk_token_id if self.tokenizer.unk_token_id is not None else 0
            log.warning("token ids >= vocab_size %d mapped to <unk>", rows)
            ids = [[t if t < rows else unk for t in seq] for seq in ids]
        return ids

    def prepare(self, texts: Sequence[str]) -> Prepared:
        """Tokenise a chunk of texts for `encode_prepared` (changes no counter)."""
        self.load()
        ids, truncated = self._tokenize(list(texts))
        return self.prepare_ids(self._clip_vocab(ids), truncated=truncated)

    def prepare_ids(self, ids: Sequence[Sequence[int]], *, truncated: int = 0) -> Prepared:
        """Token ids (already cut at max_tokens, special tokens included) as a `Prepared`."""
        lengths = np.fromiter((len(seq) for seq in ids), dtype=np.int64, count=len(ids))
        if len(lengths) and lengths.max() > self.max_tokens:
            worst = int(np.argmax(lengths))
            raise ValueError(
                f"text {worst} has {int(lengths[worst])} tokens, more than max_tokens = "
                f"{self.max_tokens}"
            )
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter(
            itertools.chain.from_iterable(ids), dtype=np.int64, count=int(offsets[-1])
        )
        return Prepared(flat=flat, offsets=offsets, truncated=truncated)

    # -- batching

    @staticmethod
    def plan_batches(
        lengths: np.ndarray, batch_tokens: int, max_padding: float = MAX_PADDING
    ) -> list[tuple[int, int]]:
        """Slices of `lengths` (sorted descending) for one forward pass each.

        A slice's first sentence is its longest, so `count * lengths[start]` is its padded
        size; each slice is as long as it can be with that size <= batch_tokens and at most
        `max_padding` of it padding. (Each added, shorter sentence raises the padded share,
        so the longest slice within the cap is found by a search.) A sentence longer than
        batch_tokens still gets a batch of its own.
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        n = len(lengths)
        out: list[tuple[int, int]] = []
        start = 0
        while start < n:
            width = int(lengths[start])
            most = min(n - start, max(1, batch_tokens // max(width, 1)))
            real = np.cumsum(lengths[start : start + most])
            padded = width * np.arange(1, most + 1)
            fits = padded - real <= max_padding * padded
            # `fits` is True up to some count and False after it.
            count = most if fits.all() else max(1, int(np.argmin(fits)))
            out.append((start, start + count))
            start += count
        return out

    # -- encoding

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32, rows L2-normalised, in the order of `texts`."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_prepared(self.prepare(texts), half=False)

    def encode_prepared(self, prepared: Prepared, *, half: bool = True) -> np.ndarray:
        """Vectors for a `Prepared` chunk, rows L2-normalised, in input order.

        half=True returns float16, the dtype the embeddings files hold: the vectors cross
        from the GPU at half the size, once per chunk.
        """
        import torch
        import torch.nn.functional as F

        self.load()
        n = len(prepared)
        out_dtype = torch.float16 if half else torch.float32
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float16 if half else np.float32)
        assert self.device is not None
        cuda = self.device.type == "cuda"
        lengths = prepared.lengths
        # Longest first: batches hold sentences of similar length, so little padding is
        # computed, and an out-of-memory error (if any) shows up in the first batch.
        order = np.argsort(-lengths, kind="stable")
        sorted_lengths = lengths[order]
        sorted_starts = prepared.offsets[:-1][order]
        # Vectors stay on the device, in sorted order, until the chunk is done: no copy
        # back (and no wait for the GPU) per batch.
        result = torch.empty((n, self.dim), dtype=out_dtype, device=self.device)
        plan = deque(self.plan_batches(sorted_lengths, self._budget))
        padded = 0
        with torch.inference_mode():
            while plan:
                start, end = plan.popleft()
                width = int(sorted_lengths[start])
                try:
                    emb = self._forward(
                        prepared.flat, sorted_starts[start:end], sorted_lengths[start:end], width
                    )
                # torch.cuda's name for it: torch.OutOfMemoryError is new in torch 2.5.
                except torch.cuda.OutOfMemoryError as err:
                    if end - start == 1:
                        raise RuntimeError(
                            f"out of GPU memory on a single sentence of {width} tokens; "
                            "lower encoder.max_tokens"
                        ) from err
                    failed = (end - start) * width
                else:
                    result[start:end] = F.normalize(emb, p=2.0, dim=1).to(out_dtype)
                    padded += (end - start) * width
                    self.batches += 1
                    continue
                # Out of the except block, so the failed batch's tensors are freed first.
                self._budget = max(failed // 2, width)
                self.oom_halvings += 1
                log.warning(
                    "CUDA out of memory on a batch of %d padded tokens; batch_tokens now %d",
                    failed,
                    self._budget,
                )
                if cuda:
                    torch.cuda.empty_cache()
                plan = deque(
                    (start + a, start + b)
                    for a, b in self.plan_batches(sorted_lengths[start:], self._budget)
                )
            if cuda:
                host = torch.empty(result.shape, dtype=out_dtype, pin_memory=True)
                host.copy_(result, non_blocking=True)
                torch.cuda.current_stream(self.device).synchronize()
            else:
                host = result
            vectors = np.empty((n, self.dim), dtype=np.float16 if half else np.float32)
            vectors[order] = host.numpy()  # back to input order
        self.truncated += prepared.truncated
        self.tokens += int(lengths.sum())
        self.padded_tokens += padded
        return vectors

    def _forward(
        self, flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int
    ) -> torch.Tensor:
        """Pooled, not yet normalised fp32 vectors for one batch."""
        import torch

        cols = np.arange(width, dtype=np.int64)
        mask = cols[None, :] < lengths[:, None]
        index = np.minimum(starts[:, None] + cols[None, :], max(len(flat) - 1, 0))
        input_ids = np.where(mask, flat[index], self._pad_id)
        ids_t = torch.from_numpy(input_ids)
        mask_t = torch.from_numpy(mask.astype(np.int64))
        if self.device is not None and self.device.type == "cuda":
            # Pinned host memory lets the copy run asynchronously, behind the GPU's work.
            ids_t = ids_t.pin_memory().to(self.device, non_blocking=True)
            mask_t = mask_t.pin_memory().to(self.device, non_blocking=True)
        hidden = self.model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0].float()
        # fp32 accumulation: summing hundreds of bf16 vectors in bf16 loses digits.
        m = mask_t.to(torch.float32)
        summed = torch.einsum("bld,bl->bd", hidden.float(), m)
        return summed / m.sum(dim=1, keepdim=True).clamp_min(1.0)


# --------------------------------------------------------------------------- reference


def card_recipe_setup(net: Any) -> None:
    """The card's settings on a freshly loaded base model, before the adapter is added:
    input grads and gradient checkpointing on (the card's order)."""
    net.enable_input_require_grads()
    net.gradient_checkpointing_enable()


def card_recipe_batch(net: Any, inputs: Mapping[str, Any]) -> np.ndarray:
    """One `padding=True` batch through the card's model, pooled as the card pools.

    No torch.no_grad and no inference_mode, as in the card: autograd records the graph.
    """
    import torch

    outputs = net(**inputs)
    last_hidden_state = outputs.last_hidden_state
    last_hidden_state[inputs["attention_mask"] == 0, :] = 0
    sent_len = inputs["attention_mask"].sum(dim=1, keepdim=True)
    sent_emb = last_hidden_state.sum(dim=1) / sent_len
    return sent_emb.detach().to(torch.float32).cpu().numpy()


def card_recipe_embeddings(
    model: str, adapter: str | None, texts: list[str], batch_size: int = 8
) -> np.ndarray:
    """The m-ST5 card's recipe, run as written; the reference for parity and benchmarks.

    Returns the card's vectors as the card computes them: fp32, not L2-normalised.

    On train vs eval mode: the card switches on gradient checkpointing and input grads
    (settings for training) but then calls `model.eval()`, so we do too. That call is what
    makes the card's vectors well defined: in train mode T5's dropout (0.1) and the LoRA
    dropout would make every call random. In eval mode transformers also skips gradient
    checkpointing, so it and `enable_input_require_grads` only cost memory (no
    `torch.no_grad` in the card: autograd records the graph) and change no number.
    """
    net, tokenizer = load_card_recipe(model, adapter)
    return run_card_recipe(net, tokenizer, texts, batch_size)


def load_card_recipe(model: str, adapter: str | None) -> tuple[Any, Any]:
    """(model, tokenizer) set up as the card sets them up (see card_recipe_embeddings)."""
    import torch

    config = load_config(model)
    # use_fast=False as in the card; with transformers 5 this is sentencepiece directly.
    tokenizer = load_tokenizer(model, use_fast=False, config=config)
    # The card's `from_pretrained("google/mt5-xxl")` gave fp32 under transformers 4.x;
    # transformers 5 defaults to the checkpoint's dtype, so ask for fp32 explicitly.
    net: Any = _model_class(config).from_pretrained(model, **_dtype_kwarg(torch.float32))
    card_recipe_setup(net)
    if adapter is not None:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, adapter)  # unmerged, as in the card
    net.eval()
    return net, tokenizer


def run_card_recipe(net: Any, tokenizer: Any, texts: list[str], batch_size: int) -> np.ndarray:
    """The card's loop: `padding=True` batches in input order -> fp32 (n, dim)."""
    chunks: list[np.ndarray] = []
    for start in range(0, len(texts), batch_size):
        inputs = tokenizer(
            texts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt"
        )
        chunks.append(card_recipe_batch(net, inputs))
    if not chunks:
        return np.zeros((0, _hidden_size(net.config)), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)
