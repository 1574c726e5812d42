"""Hugging Face transformer encoders, m-ST5 (mT5-XXL encoder + LoRA) first among them.

`HFEncoder` is the fast inference path: eval mode, `torch.inference_mode`, LoRA merged
into the base weights, bf16 on GPU, batches packed by token count after sorting by length.
`card_recipe_embeddings` is the slow reference: the pkshatech/m-ST5 model card's snippet
run as written (fp32, unmerged PeftModel, gradient checkpointing switched on, plain
`padding=True` batches). Parity tests and benchmarks compare the two.

What the m-ST5 card does (README at hub revision 41abffd): load `MT5EncoderModel` from
google/mt5-xxl, call `enable_input_require_grads()` and `gradient_checkpointing_enable()`,
wrap with `PeftModel.from_pretrained(model, "pkshatech/m-ST5")` (not merged), load the
tokenizer with `use_fast=False`, call `model.eval()`, tokenise with `padding=True,
truncation=True`, zero the hidden states at padded positions and divide the sum by the
number of real tokens (EOS included). It does not L2-normalise; cosine is applied later,
so normalising here changes no similarity.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Pooling = Literal["mean", "cls"]
DType = Literal["auto", "float32", "bfloat16", "float16"]

# Encoder-only classes for the T5 family: `AutoModel` would build the decoder as well,
# doubling memory for mT5-XXL, and the decoder's weights are never used.
T5_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


# --------------------------------------------------------------------------- loading


def load_config(model: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The model's config alone: a small JSON file, no weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # `torch_dtype` was renamed `dtype` in transformers 4.56; the project allows >= 4.46.
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


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
    so where the slow tokenizer is asked for we run sentencepiece itself.

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
    from transformers.utils import cached_file

    tok = AutoTokenizer.from_pretrained(
        model, use_fast=use_fast, revision=revision, trust_remote_code=trust_remote_code
    )
    if use_fast or not getattr(tok, "is_fast", False):
        return tok  # transformers 4.x honours use_fast=False itself
    if config is None:
        config = load_config(model, revision=revision, trust_remote_code=trust_remote_code)
    if config.model_type in T5_ENCODERS:
        spiece = cached_file(
            model, "spiece.model", revision=revision, _raise_exceptions_for_missing_entries=False
        )
        if spiece is not None:
            return SentencePieceT5Tokenizer.from_hf(spiece, tok)
    log.info("%s: no sentencepiece-backed tokenizer available; using the fast one", model)
    return tok


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


# --------------------------------------------------------------------------- encoder


class HFEncoder:
    """Sentence vectors from a transformers encoder (optionally + a peft LoRA adapter).

    Construction reads only the config (for `dim`); weights load on the first `encode`
    or an explicit `load()`, so an encoder can be built on a login node and pickled to
    workers. Pickling drops loaded weights.
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
        batch_tokens: int = 16384,
        trust_remote_code: bool = False,
        revision: str | None = None,
        use_fast_tokenizer: bool = False,
    ) -> None:
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', not {pooling!r}")
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto/float32/bfloat16/float16, not {dtype!r}")
        if max_tokens < 1 or batch_tokens < 1:
            raise ValueError("max_tokens and batch_tokens must be >= 1")
        self.model_name = str(model)
        self.adapter = str(adapter) if adapter is not None else None
        self.pooling: Pooling = pooling
        self.dtype_name: DType = dtype
        self.device_name = device
        self.max_tokens = max_tokens
        self.batch_tokens = batch_tokens
        self.trust_remote_code = trust_remote_code
        self.revision = revision
        self.use_fast_tokenizer = use_fast_tokenizer

        self.config = load_config(
            self.model_name, revision=revision, trust_remote_code=trust_remote_code
        )
        self.is_t5 = self.config.model_type in T5_ENCODERS
        self.dim: int = _hidden_size(self.config)
        if dtype == "float16" and self.is_t5:
            warnings.warn(
                "float16 with a T5-family model: T5 activations overflow fp16, so transformers "
                "keeps the `wo` projections in fp32 (slower, more memory); bfloat16 is the "
                "safe half precision for T5.",
                stacklevel=2,
            )
        # Cumulative number of input texts cut at max_tokens, over all encode() calls.
        self.truncated = 0
        self.model: Any = None
        self.tokenizer: Any = None
        self.device: torch.device | None = None
        self.torch_dtype: torch.dtype | None = None

    # -- lifecycle

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["model"] = None
        state["tokenizer"] = None
        state["device"] = None
        state["torch_dtype"] = None
        return state

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
        """Load tokenizer and weights now (idempotent)."""
        if self.model is not None:
            return self
        import torch

        device, dtype = self._resolve_device_dtype()
        self.tokenizer = load_tokenizer(
            self.model_name,
            use_fast=self.use_fast_tokenizer,
            revision=self.revision,
            trust_remote_code=self.trust_remote_code,
            config=self.config,
        )
        # With an adapter, load and merge in fp32 and cast afterwards: merging into bf16
        # weights would round twice (checkpoint -> bf16, then bf16 + delta -> bf16).
        # Costs fp32 host memory while loading (about 23 GB for the mT5-XXL encoder).
        load_dtype = torch.float32 if self.adapter else dtype
        model = _model_class(self.config).from_pretrained(
            self.model_name,
            config=self.config,
            revision=self.revision,
            trust_remote_code=self.trust_remote_code,
            # None = safetensors when the repo has them, else a .bin that transformers
            # reads with torch.load(weights_only=True): tensors only, no code unpickled.
            use_safetensors=None,
            **_dtype_kwarg(load_dtype),
        )
        if self.adapter:
            from peft import PeftModel

            # Merging folds B @ A * alpha / r into q and v: the same function as the
            # unmerged adapter, with no extra matmuls per layer at inference time.
            model = PeftModel.from_pretrained(model, self.adapter).merge_and_unload()
            if dtype != load_dtype:
                model = _cast(model, dtype)
        model.eval()  # dropout off: deterministic vectors
        model.requires_grad_(False)
        self.model = model.to(device)
        self.device, self.torch_dtype = device, dtype
        return self

    # -- encoding

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, cut at max_tokens; adds the number cut to `self.truncated`."""
        self.load()
        texts = list(texts)
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
            self.truncated += len(long)
        # An id past the embedding matrix (e.g. mT5's `<extra_id_0>`, numbered above the
        # 250112 rows) would crash the whole batch with an index error; map it to <unk>.
        rows = int(self.config.vocab_size)
        if ids and max(max(seq, default=0) for seq in ids) >= rows:
            unk = tok.unk_token_id if tok.unk_token_id is not None else 0
            log.warning("token ids >= vocab_size %d mapped to <unk>", rows)
            ids = [[t if t < rows else unk for t in seq] for seq in ids]
        return ids

    @staticmethod
    def plan_batches(lengths: np.ndarray, batch_tokens: int) -> list[tuple[int, int]]:
        """Slices of `lengths` (sorted descending) whose padded size fits batch_tokens.

        The first sentence of a slice is its longest, so `count * lengths[start]` is the
        padded size. A sentence longer than batch_tokens still gets a batch of its own.
        """
        out: list[tuple[int, int]] = []
        start, n = 0, len(lengths)
        while start < n:
            size = max(1, batch_tokens // max(int(lengths[start]), 1))
            end = min(n, start + size)
            out.append((start, end))
            start = end
        return out

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch
        import torch.nn.functional as F

        self.load()
        ids = self.tokenize(texts)
        lengths = np.fromiter((len(seq) for seq in ids), dtype=np.int64, count=len(ids))
        # Longest first: batches hold sentences of similar length, so little padding is
        # computed, and an out-of-memory error (if any) shows up in the first batch.
        order = np.argsort(-lengths, kind="stable")
        pad_id = self.tokenizer.pad_token_id
        pad_id = 0 if pad_id is None else int(pad_id)
        cuda = self.device is not None and self.device.type == "cuda"
        out = np.empty((len(ids), self.dim), dtype=np.float32)

        with torch.inference_mode():
            for start, end in self.plan_batches(lengths[order], self.batch_tokens):
                rows = order[start:end]
                width = int(lengths[rows[0]])  # each batch padded to its own longest
                input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
                mask = np.zeros((len(rows), width), dtype=np.int64)
                for r, i in enumerate(rows):
                    input_ids[r, : lengths[i]] = ids[i]
                    mask[r, : lengths[i]] = 1
                ids_t, mask_t = torch.from_numpy(input_ids), torch.from_numpy(mask)
                if cuda:
                    # Pinned host memory lets the copy run asynchronously.
                    ids_t, mask_t = ids_t.pin_memory(), mask_t.pin_memory()
                ids_t = ids_t.to(self.device, non_blocking=cuda)
                mask_t = mask_t.to(self.device, non_blocking=cuda)
                hidden = self.model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
                if self.pooling == "mean":
                    # fp32 accumulation: summing hundreds of bf16 vectors in bf16 loses digits.
                    m = mask_t.to(torch.float32)
                    summed = torch.einsum("bld,bl->bd", hidden.float(), m)
                    emb = summed / m.sum(dim=1, keepdim=True).clamp_min(1.0)
                else:
                    emb = hidden[:, 0].float()
                emb = F.normalize(emb, p=2.0, dim=1)
                # Scatter to the original positions: this applies the inverse of `order`
                # as we go, and moving each batch to the CPU here keeps GPU memory flat.
                out[rows] = emb.cpu().numpy()
        return out


# --------------------------------------------------------------------------- reference


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
    import torch
    from peft import PeftModel

    config = load_config(model)
    # use_fast=False as in the card; with transformers 5 this is sentencepiece directly.
    tokenizer = load_tokenizer(model, use_fast=False, config=config)
    # The card's `from_pretrained("google/mt5-xxl")` gave fp32 under transformers 4.x;
    # transformers 5 defaults to the checkpoint's dtype, so ask for fp32 explicitly.
    net: Any = _model_class(config).from_pretrained(model, **_dtype_kwarg(torch.float32))
    net.enable_input_require_grads()
    net.gradient_checkpointing_enable()
    if adapter is not None:
        net = PeftModel.from_pretrained(net, adapter)  # unmerged, as in the card
    net.eval()

    chunks: list[np.ndarray] = []
    for start in range(0, len(texts), batch_size):
        inputs = tokenizer(
            texts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt"
        )
        outputs = net(**inputs)
        last_hidden_state = outputs.last_hidden_state
        last_hidden_state[inputs["attention_mask"] == 0, :] = 0
        sent_len = inputs["attention_mask"].sum(dim=1, keepdim=True)
        sent_emb = last_hidden_state.sum(dim=1) / sent_len
        chunks.append(sent_emb.detach().to(torch.float32).numpy())
    if not chunks:
        return np.zeros((0, _hidden_size(config)), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)
