"""The artifact on disk: round trip, checksums, corruption, versions, devices, atomic writes, no transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.errors import ArtifactError
from tests.conftest import make_model, random_ids, run_python


@pytest.fixture()
def art(artifacts, tmp_path) -> Path:
    """A private copy of the llama artifact, free to damage."""
    dst = tmp_path / "art"
    shutil.copytree(artifacts("llama"), dst)
    return dst


def test_layout_and_manifest(art):
    names = sorted(p.relative_to(art).as_posix() for p in art.rglob("*") if p.is_file())
    assert names == ["config.json", "graph.json", "manifest.json", "model.safetensors"]
    m = json.loads((art / "manifest.json").read_text())
    assert m["format"] == "lmforge.artifact" and m["format_version"] == 1
    assert m["lmforge_version"] == lmforge.__version__ and m["dtype"] == "float32" and m["max_seq_len"] == 64
    assert m["source"]["architectures"] == ["LlamaForCausalLM"]
    assert m["pipeline"].startswith("remove-noops,dce") and [p["pass"] for p in m["passes"]][0] == "remove-noops"
    assert set(m["files"]) == {"config.json", "graph.json", "model.safetensors"}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in m["files"].values())
    assert m["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # layers * (k+v) * kv heads * head_dim * fp32


def test_round_trip_matches_hf(art):
    eng = lmforge.load(art)
    model = make_model("llama")
    ids = random_ids(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(eng.forward(ids), model(ids).logits, rtol=1e-4, atol=1e-4)


def _flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda a: _flip_byte(a / "model.safetensors"), "model.safetensors fails its sha256 check"),
    (lambda a: (a / "model.safetensors").write_bytes((a / "model.safetensors").read_bytes()[:-10]), "model.safetensors is truncated"),
    (lambda a: (a / "graph.json").unlink(), "graph.json is missing"),
    (lambda a: (a / "manifest.json").write_text((a / "manifest.json").read_text()[:200]), "manifest.json is corrupt or truncated"),
    (lambda a: (a / "manifest.json").unlink(), "is not an lmforge artifact"),
])
def test_damaged_artifacts_give_one_line_errors(art, damage, message):
    damage(art)
    with pytest.raises(ArtifactError) as err:
        lmforge.load(art)
    assert message in str(err.value) and "\n" not in str(err.value)


def _edit_manifest(art: Path, edit) -> None:
    m = json.loads((art / "manifest.json").read_text())
    edit(m)
    (art / "manifest.json").write_text(json.dumps(m))


def test_wrong_checksum_in_manifest(art):
    _edit_manifest(art, lambda m: m["files"]["graph.json"].update(sha256="0" * 64))
    with pytest.raises(ArtifactError, match="graph.json fails its sha256 check"):
        lmforge.load(art)


def test_version_mismatch(art):
    _edit_manifest(art, lambda m: m.update(format_version=99))
    with pytest.raises(ArtifactError, match="format version 99, this lmforge .* reads version 1"):
        lmforge.load(art)


def test_unlisted_paths_are_refused(art):
    _edit_manifest(art, lambda m: m["files"].update({"../../etc/passwd": {"sha256": "0", "bytes": 1}}))
    with pytest.raises(ArtifactError, match="unexpected file"):
        lmforge.load(art)


def test_missing_artifact_and_wrong_device(tmp_path, art):
    with pytest.raises(ArtifactError, match="no artifact at"):
        lmforge.load(tmp_path / "nothing")
    if not torch.cuda.is_available():
        with pytest.raises(ArtifactError, match="no usable CUDA GPU"):
            lmforge.load(art, device="cuda")
    with pytest.raises(ArtifactError, match="unknown device"):
        lmforge.load(art, device="gpu0")


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"

    def explode(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user hit Ctrl-C while the weights were being written

    monkeypatch.setattr("safetensors.torch.save_file", explode)
    with pytest.raises(KeyboardInterrupt):
        lmforge.optimize(make_model("gpt2"), out, max_seq_len=32)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_rewrite_replaces_only_artifacts(tmp_path, art):
    lmforge.optimize(make_model("gpt2"), art, max_seq_len=32)  # over an earlier artifact: fine
    assert json.loads((art / "manifest.json").read_text())["source"]["model_type"] == "gpt2"
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not an lmforge artifact; refusing to overwrite"):
        lmforge.optimize(make_model("gpt2"), other, max_seq_len=32)
    assert (other / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("quant", [None, "int4"])
def test_runtime_never_imports_transformers(art, quant, tmp_path):
    """Neither transformers nor torchao (quantization math, at optimize time only) at run time."""
    if quant:
        art = tmp_path / "q"
        lmforge.optimize(make_model("llama"), art, max_seq_len=32, quant=quant, group_size=32)
    code = (
        "import sys, torch, lmforge\n"
        f"eng = lmforge.load({str(art)!r})\n"
        "out = eng.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4)\n"
        "assert out.shape == (1, 7), out.shape\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'torchao')]\n"
        "assert not bad, bad[:3]\n"
        "print('ok')\n"
    )
    assert run_python(code) == "ok"


_WATCHED: list[Path] = []  # the artifact folder whose reads the audit hook checks, while a test sets it


def _audit(event: str, args) -> None:
    if not _WATCHED:
        return
    if event == "pickle.find_class":
        raise AssertionError(f"unpickled {args} while loading an artifact")
    if event == "open" and isinstance(args[0], (str, Path)):
        path = Path(args[0]).resolve()
        if path.is_relative_to(_WATCHED[0]) and path.suffix not in (".json", ".safetensors"):
            raise AssertionError(f"opened {path.name} while loading an artifact: only JSON and safetensors may be read")


def test_loading_reads_no_pickle(art, monkeypatch):
    """Loading and running an artifact reads JSON and safetensors only: no torch.load, no unpickling, no
    other file of the folder opened (an audit hook sees every Python-level open and unpickled global)."""
    import pickle
    import sys

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load / pickle used while loading an artifact")

    for owner, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads"),
                        (pickle, "Unpickler")):
        monkeypatch.setattr(owner, name, forbidden)
    (art / "extra.pkl").write_bytes(pickle.dumps({"not": "read"}))  # bait: a loader that globs would open it
    if _audit not in getattr(sys, "_lmforge_hooks", ()):
        sys.addaudithook(_audit)  # hooks cannot be removed; _WATCHED switches this one on and off
        sys._lmforge_hooks = (_audit,)
    _WATCHED.append(art.resolve())
    try:
        logits = lmforge.load(art).forward(torch.tensor([[1, 2]]))
    finally:
        _WATCHED.clear()
    assert logits.shape == (1, 2, 131) and torch.isfinite(logits).all()


def test_same_model_same_bytes(tmp_path):
    """Two optimizes of one model write byte-identical weights and graph (only the manifest's timestamp
    differs), so an artifact's checksums identify its contents."""
    model = make_model("llama")
    first, second = (lmforge.optimize(model, tmp_path / name, max_seq_len=32, quant="int4", group_size=32)
                     for name in ("a", "b"))
    for name in ("model.safetensors", "graph.json"):
        assert first.manifest["files"][name]["sha256"] == second.manifest["files"][name]["sha256"], name
