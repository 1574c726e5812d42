"""Export once, load fast: base model + adapter -> one merged, encoder-only bf16 folder.

The hub's google/mt5-xxl is one 52 GB fp32 pickle holding encoder and decoder; every
embed task that starts from it reads all of it, merges the LoRA in fp32 and casts. The
export does that once and writes what the tasks need: the encoder alone, LoRA merged,
in bf16 safetensors (about 11 GB for mT5-XXL), with the tokenizer files beside it. The
folder is an ordinary transformers model folder, so a job loads it through the same
`from_pretrained` path as a hub id: `encoder.model = "<folder>"` and no adapter.

bf16 and not fp16: T5's activations overflow fp16 (transformers keeps `wo` in fp32
under fp16, which would make the export both larger and slower).

Nothing here runs code from a checkpoint: weights come from safetensors or from
`torch.load(weights_only=True)`, and trust_remote_code stays off unless asked for.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mining.encoders import hf

log = logging.getLogger(__name__)

# Written into the folder: where it came from, so a person can tell two exports apart.
MANIFEST = "mining_export.json"
# Tokenizer files copied as they are, where the source has them; spiece.model is what
# the sentencepiece tokenizer (the default for T5 models) reads.
TOKENIZER_FILES = (
    "spiece.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def export_model(
    model: str,
    out_dir: str | Path,
    *,
    adapter: str | None = None,
    revision: str | None = None,
    dtype: str = "bfloat16",
    trust_remote_code: bool = False,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Load `model` (+ `adapter`), merge, keep the encoder, save `dtype` safetensors.

    The folder appears complete or not at all: it is written beside `out_dir` under a
    temporary name and renamed into place.
    """
    import torch

    if dtype not in ("bfloat16", "float32", "float16"):
        raise ValueError(f"dtype must be bfloat16, float32 or float16, not {dtype!r}")
    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out}: exists and is not empty (use --overwrite to replace it)")
    torch_dtype = getattr(torch, dtype)

    config = hf.load_config(model, revision=revision, trust_remote_code=trust_remote_code)
    # fp32 for the merge (B @ A * alpha / r added once, then one rounding to bf16), and
    # the encoder-only class, so a T5 checkpoint's decoder is never built.
    net: Any = hf._model_class(config).from_pretrained(
        model,
        config=config,
        revision=revision,
        trust_remote_code=trust_remote_code,
        **hf._safe_load_kwargs(),
        **hf._dtype_kwarg(torch.float32),
    )
    if adapter:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, adapter).merge_and_unload()
    net = hf._cast(net, torch_dtype)
    net.eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # transformers 5 writes safetensors only; older versions need asking.
        net.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
        _save_tokenizer(model, revision, trust_remote_code, tmp)
        manifest = {
            "base": model,
            "revision": revision,
            "adapter": adapter,
            "merged": bool(adapter),
            "dtype": dtype,
            "encoder_only": True,
            "architecture": type(net).__name__,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s%s as %s to %s", model, f" + {adapter}" if adapter else "", dtype, out)
    return out


def _save_tokenizer(model: str, revision: str | None, trust_remote_code: bool, out: Path) -> None:
    from transformers import AutoTokenizer
    from transformers.utils import cached_file

    # save_pretrained writes the fast tokenizer's files; in transformers 5 it does not
    # write spiece.model, which the sentencepiece path needs, so copy the originals too.
    tokenizer = AutoTokenizer.from_pretrained(
        model, revision=revision, trust_remote_code=trust_remote_code
    )
    tokenizer.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        source = cached_file(
            model, name, revision=revision, _raise_exceptions_for_missing_entries=False
        )
        if source is not None:
            shutil.copyfile(source, out / name)
