"""`mining model export`: merged, encoder-only safetensors that load like a hub id.

Also: loading never runs code from a checkpoint (a pickle that would run code is
refused), and a repo's own Python code needs trust_remote_code.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from mining.cli import main
from mining.encoders.hf import HFEncoder, load_config
from mining.export import export_model

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning"),
]

TEXTS = [
    "I am a dog.",
    "Die Katze schläft auf der warmen Fensterbank.",
    "Où est la gare ? Ça fait déjà une heure que j'attends.",
    "猫は暖かい窓辺で寝ています。",
    "x",
]


@pytest.fixture(scope="module")
def exported(tiny_mst5: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    base, adapter = tiny_mst5
    out = tmp_path_factory.mktemp("exports") / "mst5-bf16"
    assert main(["model", "export", "--model", str(base), "--adapter", str(adapter), str(out)]) == 0
    return out


def test_export_folder_holds_only_the_merged_encoder(exported: Path) -> None:
    from safetensors import safe_open

    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "spiece.model", "tokenizer.json", "mining_export.json"} <= names
    # Weights as safetensors only: nothing in the folder is a pickle.
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    weights = [p for p in exported.iterdir() if p.suffix == ".safetensors"]
    assert weights
    keys: list[str] = []
    for path in weights:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            keys += names
            assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}
    assert not [k for k in keys if "lora" in k or k.startswith("decoder")]
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["MT5EncoderModel"]
    manifest = json.loads((exported / "mining_export.json").read_text())
    assert manifest["merged"] and manifest["dtype"] == "bfloat16"


def test_export_loads_like_base_plus_adapter(tiny_mst5: tuple[Path, Path], exported: Path) -> None:
    base, adapter = tiny_mst5
    # The export is the merge in fp32 + one cast, exactly what HFEncoder does on load.
    direct = HFEncoder(str(base), adapter=str(adapter), dtype="bfloat16", device="cpu")
    from_export = HFEncoder(str(exported), dtype="bfloat16", device="cpu")
    np.testing.assert_array_equal(from_export.encode(TEXTS), direct.encode(TEXTS))
    assert from_export.tokenize(TEXTS) == direct.tokenize(TEXTS)
    reference = HFEncoder(str(base), adapter=str(adapter), dtype="float32", device="cpu")
    cos = np.sum(from_export.encode(TEXTS) * reference.encode(TEXTS), axis=1)
    assert cos.min() >= 0.999


def test_float32_export_equals_unexported(tiny_mst5: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = tiny_mst5
    out = export_model(str(base), tmp_path / "fp32", adapter=str(adapter), dtype="float32")
    got = HFEncoder(str(out), dtype="float32", device="cpu").encode(TEXTS)
    want = HFEncoder(str(base), adapter=str(adapter), dtype="float32", device="cpu").encode(TEXTS)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_export_will_not_clobber(tiny_mst5: tuple[Path, Path], exported: Path) -> None:
    base, _ = tiny_mst5
    with pytest.raises(ValueError, match="not empty"):
        export_model(str(base), exported)
    assert main(["model", "export", "--model", str(base), str(exported)]) == 1


class _RunsCode:
    """A pickle that, when loaded without weights_only, writes a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_pickled_code_in_a_checkpoint_never_runs(
    tiny_mst5: tuple[Path, Path], tmp_path: Path
) -> None:
    base, _ = tiny_mst5
    evil = tmp_path / "evil"
    evil.mkdir()
    for name in ("config.json", "spiece.model", "tokenizer.json", "tokenizer_config.json"):
        (evil / name).write_bytes((base / name).read_bytes())
    marker = tmp_path / "marker"
    payload = pickle.dumps({"encoder.embed_tokens.weight": _RunsCode(marker)})
    pickle.loads(payload)  # the control: an unguarded load runs it
    assert marker.exists()
    marker.unlink()
    (evil / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError, match="Weights only"):
        HFEncoder(str(evil), device="cpu").load()
    with pytest.raises(pickle.UnpicklingError, match="Weights only"):
        export_model(str(evil), tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_remote_code_needs_trust(tmp_path: Path) -> None:
    repo = tmp_path / "custom"
    repo.mkdir()
    marker = tmp_path / "marker"
    (repo / "config.json").write_text(
        json.dumps({"model_type": "custom", "auto_map": {"AutoConfig": "custom.CustomConfig"}})
    )
    (repo / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('code ran')\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_config(str(repo))
    with pytest.raises(ValueError, match="trust_remote_code"):
        HFEncoder(str(repo))
    assert not marker.exists()
