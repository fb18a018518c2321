"""The learned-optimizer checkpoint format: exact round trips, and refusal of anything else."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch

from l2o.learned import (
    CheckpointError,
    LSTMLOpt,
    MLPLOpt,
    checkpoint_id,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    shipped_checkpoints,
)
from l2o.learned import checkpoint as ckpt


def trained(lopt, seed: int = 0):
    """Meta-parameters that differ from init (as after meta-training)."""
    meta = lopt.init_meta(torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in meta.items()}


@pytest.fixture
def saved(tmp_path):
    lopt = MLPLOpt(hidden_sizes=[8, 8])
    meta = trained(lopt)
    base = tmp_path / "run" / "lopt"
    save_checkpoint(base, lopt, meta, extra_card={"provenance": {"step": 12, "config": {"a": 1}}})
    return base, lopt, meta


def forge(base: Path, tensors: dict, spec: dict) -> None:
    """A self-consistent pair written by a hostile or buggy tool that controls both files:
    the tensors file's metadata and the card agree with each other and with the bytes."""
    digest = ckpt.tensors_digest(tensors)
    metadata = {
        "format": "l2o-lopt",
        "format_version": "2",
        "lopt": json.dumps(spec),
        "tensors_sha256": digest,
    }
    data = safetensors.torch.save(tensors, metadata=metadata)
    Path(f"{base}.safetensors").write_bytes(data)
    card = card_of(base)
    card.update(lopt=spec, tensors_sha256=digest, sha256=hashlib.sha256(data).hexdigest())
    card["tensors"] = {
        k: {"shape": list(v.shape), "dtype": "float32"} for k, v in sorted(tensors.items())
    }
    write_card(base, card)


def card_of(base: Path) -> dict:
    return json.loads(Path(f"{base}.json").read_text())


def write_card(base: Path, card: dict) -> None:
    Path(f"{base}.json").write_text(json.dumps(card))


@pytest.mark.parametrize(
    "lopt", [MLPLOpt(), MLPLOpt(hidden_sizes=[4], learn_decays=True), LSTMLOpt(hidden_size=5)]
)
def test_round_trip_is_exact_and_rebuilds_the_same_lopt(tmp_path, lopt):
    meta = trained(lopt)
    card_path = save_checkpoint(tmp_path / "ck", lopt, meta)
    assert card_path == tmp_path / "ck.json"
    for path in (tmp_path / "ck", tmp_path / "ck.json", str(tmp_path / "ck.safetensors")):
        loaded, loaded_meta, card = load_checkpoint(path)
        assert type(loaded) is type(lopt) and loaded.config() == lopt.config()
        assert loaded_meta.keys() == meta.keys()
        for k in meta:
            assert loaded_meta[k].dtype == meta[k].dtype
            assert torch.equal(loaded_meta[k], meta[k])
        assert card["format"] == "l2o-lopt" and card["lopt"]["name"] == lopt.name


def test_card_records_identity_and_provenance(saved):
    base, lopt, meta = saved
    card = card_of(base)
    assert card["format_version"] == ckpt.FORMAT_VERSION
    assert card["lopt"] == {"name": "mlp", "config": lopt.config()}
    assert card["sha256"] == hashlib.sha256(Path(f"{base}.safetensors").read_bytes()).hexdigest()
    assert card["tensors"]["w0"] == {"shape": list(meta["w0"].shape), "dtype": "float32"}
    prov = card["provenance"]
    assert prov["step"] == 12 and prov["config"] == {"a": 1}
    assert prov["torch_version"] == torch.__version__
    assert {"created_utc", "hardware", "l2o_version"} <= set(prov)


def test_checkpoint_id_names_the_lopt_and_its_tensors(saved, tmp_path):
    base, lopt, meta = saved
    card = load_checkpoint(base)[2]
    assert checkpoint_id(card) == card["id"] == card_of(base)["id"]
    assert card["id"].startswith("mlp-") and len(card["id"]) == len("mlp-") + 12
    save_checkpoint(tmp_path / "same", lopt, meta, extra_card={"provenance": {"step": 99}})
    assert checkpoint_id(load_checkpoint(tmp_path / "same")[2]) == checkpoint_id(card)
    save_checkpoint(tmp_path / "other", lopt, trained(lopt, seed=5))
    assert checkpoint_id(load_checkpoint(tmp_path / "other")[2]) != checkpoint_id(card)
    # The same tensors under another behaviour-defining config are another optimizer.
    config = {**lopt.config(), "step_mult": 0.5}
    save_checkpoint(tmp_path / "scaled", MLPLOpt(**config), meta)
    assert checkpoint_id(load_checkpoint(tmp_path / "scaled")[2]) != checkpoint_id(card)
    with pytest.raises(CheckpointError):
        checkpoint_id({"format": "something"})


def test_loaded_rule_gives_the_same_updates(saved):
    base, lopt, meta = saved
    loaded, loaded_meta, _ = load_checkpoint(base)
    params = {"w": torch.randn(5, 4), "b": torch.randn(4)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    a = lopt.rule(meta).update(grads, lopt.rule(meta).init(params), params, step=0)[0]
    b = loaded.rule(loaded_meta).update(
        grads, loaded.rule(loaded_meta).init(params), params, step=0
    )
    assert all(torch.equal(a[k], b[0][k]) for k in a)


def test_map_location_moves_tensors(saved):
    base, _, _ = saved
    _, meta, _ = load_checkpoint(base, map_location="cpu")
    assert all(v.device == torch.device("cpu") for v in meta.values())


@pytest.mark.gpu
def test_map_location_cuda_puts_meta_params_on_the_gpu(saved):
    base, _, meta = saved
    _, on_gpu, _ = load_checkpoint(base, map_location="cuda")
    assert all(v.is_cuda and torch.equal(v.cpu(), meta[k]) for k, v in on_gpu.items())


# --- what save refuses ------------------------------------------------------------------------


def test_save_refuses_meta_params_of_another_architecture(tmp_path):
    with pytest.raises(CheckpointError, match="do not belong"):
        save_checkpoint(tmp_path / "x", MLPLOpt(hidden_sizes=[8]), trained(MLPLOpt()))
    assert not (tmp_path / "x.json").exists()


def test_save_refuses_non_json_cards_and_reserved_keys(tmp_path):
    lopt = LSTMLOpt(hidden_size=3)
    with pytest.raises(CheckpointError, match="plain JSON"):
        save_checkpoint(tmp_path / "x", lopt, trained(lopt), extra_card={"t": torch.ones(2)})
    with pytest.raises(CheckpointError, match="reserved"):
        save_checkpoint(tmp_path / "y", lopt, trained(lopt), extra_card={"sha256": "0"})


# --- what load refuses ------------------------------------------------------------------------


def test_missing_files_name_what_is_expected(saved, tmp_path):
    with pytest.raises(CheckpointError, match=r"no l2o checkpoint.*\.json.*\.safetensors"):
        load_checkpoint(tmp_path / "nothing-here")
    base, _, _ = saved
    os.remove(f"{base}.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(base)


def test_truncated_tensors_file_is_rejected(saved):
    base, _, _ = saved
    path = Path(f"{base}.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(base)


def test_truncated_card_is_rejected(saved):
    base, _, _ = saved
    path = Path(f"{base}.json")
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="not a valid checkpoint card"):
        load_checkpoint(base)


def test_flipped_bytes_are_rejected(saved):
    base, _, _ = saved
    path = Path(f"{base}.safetensors")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(base)
    # Without the card, the digest stored in the tensors file itself catches the flip.
    os.remove(f"{base}.json")
    with pytest.warns(ckpt.StaleCardWarning), pytest.raises(CheckpointError, match="flipped"):
        load_checkpoint(base)


def test_wrong_hash_in_card_is_rejected(saved):
    base, _, _ = saved
    card = card_of(base)
    card["sha256"] = "0" * 64
    write_card(base, card)
    with pytest.raises(CheckpointError, match="does not match its card"):
        load_checkpoint(base)


@pytest.mark.parametrize("which", ["json", "safetensors"])
def test_random_bytes_are_rejected(saved, which):
    base, _, _ = saved
    path = Path(f"{base}.{which}")
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator()).byte().numpy())
    with pytest.raises(CheckpointError):
        load_checkpoint(base)


def test_random_bytes_with_a_matching_hash_are_rejected_as_unreadable(saved):
    base, _, _ = saved
    path = Path(f"{base}.safetensors")
    path.write_bytes(os.urandom(4096))
    card = card_of(base)
    card["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    write_card(base, card)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(base)


class _CreatesAFileWhenUnpickled:
    """A hostile payload: unpickling it runs ``open(marker, "w")``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_files_are_rejected_without_being_unpickled(saved, tmp_path):
    base, _, _ = saved
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesAFileWhenUnpickled(marker))
    # 1. a pickle passed directly (torch.save style file)
    (tmp_path / "model.pt").write_bytes(payload)
    with pytest.raises(CheckpointError, match="no l2o checkpoint"):
        load_checkpoint(tmp_path / "model.pt")
    # 2. a pickle in place of the tensors, with a card whose hash matches it
    path = Path(f"{base}.safetensors")
    path.write_bytes(payload)
    card = card_of(base)
    card["sha256"] = hashlib.sha256(payload).hexdigest()
    write_card(base, card)
    with pytest.raises(CheckpointError):
        load_checkpoint(base)
    # 3. a pickle in place of the card
    Path(f"{base}.json").write_bytes(payload)
    with pytest.raises(CheckpointError):
        load_checkpoint(base)
    assert not marker.exists()


def test_json_with_a_foreign_format_is_rejected(saved):
    base, _, _ = saved
    write_card(base, {"format": "some-other-tool", "weights": "model.bin"})
    with pytest.raises(CheckpointError, match="not an l2o learned-optimizer checkpoint"):
        load_checkpoint(base)
    write_card(base, [1, 2, 3])
    with pytest.raises(CheckpointError, match="not an l2o learned-optimizer checkpoint"):
        load_checkpoint(base)


def test_newer_format_version_asks_for_an_upgrade(saved):
    base, _, _ = saved
    card = card_of(base)
    card["format_version"] = ckpt.FORMAT_VERSION + 1
    write_card(base, card)
    with pytest.raises(CheckpointError, match="upgrade l2o"):
        load_checkpoint(base)


def test_mismatched_shapes_are_rejected(saved):
    base, lopt, meta = saved
    spec = {"name": "mlp", "config": {**lopt.config(), "hidden_sizes": [16, 8]}}
    forge(base, meta, spec)  # the tensors were saved for [8, 8]
    with pytest.raises(
        CheckpointError, match=r"'b0' has shape \[8\] but 'mlp' with this config expects \[16\]"
    ):
        load_checkpoint(base)


def test_tensors_from_another_lopt_with_a_forged_hash_are_rejected(saved, tmp_path):
    base, _, _ = saved
    other = LSTMLOpt(hidden_size=4)
    forge(base, trained(other), {"name": "mlp", "config": MLPLOpt(hidden_sizes=[8, 8]).config()})
    with pytest.raises(CheckpointError, match="missing tensors"):
        load_checkpoint(base)


def test_a_card_edited_after_saving_is_refused(saved):
    base, _, _ = saved
    card = card_of(base)
    card["lopt"]["config"]["step_mult"] = 0.5  # the behaviour, not the tensors
    write_card(base, card)
    with pytest.raises(CheckpointError, match=r"edited.*step_mult: card 0.5, stored 0.001"):
        load_checkpoint(base)


def test_a_stale_card_from_an_interrupted_save_falls_back_to_the_tensors_file(saved, tmp_path):
    base, lopt, _ = saved
    old_card = Path(f"{base}.json").read_bytes()
    newer = trained(lopt, seed=7)
    save_checkpoint(base, lopt, newer)
    want = card_of(base)["id"]
    Path(f"{base}.json").write_bytes(old_card)  # as if killed between the two writes
    with pytest.warns(ckpt.StaleCardWarning, match="stale"):
        _, loaded, card = load_checkpoint(base)
    assert card["id"] == want and all(torch.equal(loaded[k], newer[k]) for k in newer)


def test_unknown_lopt_and_hostile_config_never_import_anything(saved, tmp_path):
    base, _, meta = saved
    marker = tmp_path / "pwned"
    forge(base, meta, {"name": "os.system", "config": {}})
    with pytest.raises(CheckpointError, match=r"not registered \(known: .*mlp"):
        load_checkpoint(base)
    hostile = {"_target_": "builtins.open", "file": str(marker), "mode": "w"}
    forge(base, meta, {"name": "mlp", "config": hostile})
    with pytest.raises(CheckpointError, match="cannot build"):
        load_checkpoint(base)
    assert not marker.exists()


def test_hostile_sizes_and_nesting_are_refused_before_any_allocation(saved):
    base, lopt, meta = saved
    # 4 TB of float32 if it were built: refused from shapes computed on fake tensors.
    forge(base, meta, {"name": "mlp", "config": {**lopt.config(), "hidden_sizes": [1e6, 1e6]}})
    with pytest.raises(CheckpointError, match="more than the"):
        load_checkpoint(base)
    Path(f"{base}.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested"):
        load_checkpoint(base)
    card = {"format": "l2o-lopt", "format_version": 2}
    node = card
    for _ in range(ckpt.MAX_CARD_DEPTH + 1):
        node["x"] = {}
        node = node["x"]
    write_card(base, card)
    with pytest.raises(CheckpointError, match="nested more than"):
        load_checkpoint(base)


def test_non_finite_meta_params_are_refused_on_save_and_rejected_on_load(tmp_path):
    lopt = LSTMLOpt(hidden_size=3)
    meta = trained(lopt)
    save_checkpoint(tmp_path / "ok", lopt, meta)
    meta["out.b"] = torch.tensor([float("nan")])
    with pytest.raises(CheckpointError, match=r"\['out.b'\] hold NaN"):
        save_checkpoint(tmp_path / "nan", lopt, meta)
    assert not list(tmp_path.glob("nan*"))
    # A NaN tensors file with matching (forged) hashes is still refused on load.
    forge(tmp_path / "ok", meta, {"name": "lstm", "config": lopt.config()})
    with pytest.raises(CheckpointError, match="non-finite"):
        load_checkpoint(tmp_path / "ok")


def test_meta_params_that_share_memory_save_and_load(tmp_path):
    lopt = LSTMLOpt(hidden_size=3)
    meta = trained(lopt)
    flat = torch.cat([v.reshape(-1) for v in meta.values()])
    views, offset = {}, 0
    for k, v in meta.items():  # views into one flat vector, as an ES estimator may hold them
        views[k] = flat[offset : offset + v.numel()].view(v.shape)
        offset += v.numel()
    save_checkpoint(tmp_path / "views", lopt, views)
    loaded = load_checkpoint(tmp_path / "views")[1]
    assert all(torch.equal(loaded[k], meta[k]) for k in meta)


def test_failed_save_leaves_an_existing_checkpoint_intact(saved):
    base, lopt, _ = saved
    before = Path(f"{base}.safetensors").read_bytes(), Path(f"{base}.json").read_bytes()
    with pytest.raises(CheckpointError):
        save_checkpoint(base, lopt, trained(lopt, seed=3), extra_card={"bad": torch.ones(1)})
    after = Path(f"{base}.safetensors").read_bytes(), Path(f"{base}.json").read_bytes()
    assert before == after
    load_checkpoint(base)


# --- shipped checkpoints ----------------------------------------------------------------------


def test_resolve_maps_bare_names_to_shipped_checkpoints(tmp_path, monkeypatch):
    shipped = tmp_path / "checkpoints"
    shipped.mkdir()
    monkeypatch.setattr(ckpt, "SHIPPED_DIR", shipped)
    monkeypatch.setattr(ckpt, "SHIPPED_ALIASES", {"default": "b"})
    lopt = LSTMLOpt(hidden_size=3)
    save_checkpoint(shipped / "a", lopt, trained(lopt))
    assert shipped_checkpoints() == ("a",)  # an alias is listed only when its target is shipped
    with pytest.raises(CheckpointError, match=r"no shipped checkpoint named 'default'.*a"):
        resolve_checkpoint("default")
    assert resolve_checkpoint("a") == shipped / "a"
    assert load_checkpoint(resolve_checkpoint("a"))[0].config() == lopt.config()
    with pytest.raises(CheckpointError, match=r"no shipped checkpoint named 'nope'.*a"):
        resolve_checkpoint("nope")
    assert resolve_checkpoint("./nope") == Path("./nope")
    assert resolve_checkpoint(tmp_path / "x.json") == tmp_path / "x.json"
    assert resolve_checkpoint("runs/a/lopt") == Path("runs/a/lopt")


def test_an_alias_resolves_to_its_target_even_beside_a_file_of_its_name(tmp_path, monkeypatch):
    shipped = tmp_path / "checkpoints"
    shipped.mkdir()
    monkeypatch.setattr(ckpt, "SHIPPED_DIR", shipped)
    monkeypatch.setattr(ckpt, "SHIPPED_ALIASES", {"default": "b"})
    lopt = LSTMLOpt(hidden_size=3)
    save_checkpoint(shipped / "b", lopt, trained(lopt, seed=1))
    save_checkpoint(shipped / "default", lopt, trained(lopt, seed=2))  # a stale old default
    assert shipped_checkpoints() == ("b", "default")
    assert resolve_checkpoint("default") == shipped / "b"
    identity = load_checkpoint(shipped / "b")[2]["id"]
    assert ckpt.shipped_names_of(identity) == ("b", "default")
    assert ckpt.shipped_names_of(load_checkpoint(shipped / "default")[2]["id"]) == ("default",)
    assert ckpt.shipped_names_of("lstm-000000000000") == ()


def test_the_default_is_ortho_long_mixture_and_the_previous_defaults_are_shipped_by_name():
    assert {"default", "mlp_2x32", "ortho_mlp", "ortho_long_mixture"} <= set(shipped_checkpoints())
    assert resolve_checkpoint("default") == ckpt.SHIPPED_DIR / "ortho_long_mixture"
    _, _, card = load_checkpoint(resolve_checkpoint("mlp_2x32"))
    assert card["id"] == "mlp-6676045c48f7"  # the old default's identity, unchanged
    assert ckpt.shipped_names_of(card["id"]) == ("mlp_2x32",)
    _, _, card = load_checkpoint(resolve_checkpoint("ortho_mlp"))
    assert card["id"] == "ortho_mlp-b40a2ff24547"  # the default until 2026-12-07, unchanged
    assert ckpt.shipped_names_of(card["id"]) == ("ortho_mlp",)


def test_shipped_checkpoint_folder_is_next_to_the_package():
    import l2o

    assert Path(l2o.__file__).resolve().parents[1] / "checkpoints" == ckpt.SHIPPED_DIR
    for name in shipped_checkpoints():  # every shipped checkpoint must load
        load_checkpoint(resolve_checkpoint(name))


def test_non_finite_metrics_are_written_as_null_and_listed(tmp_path):
    lopt = LSTMLOpt(hidden_size=3)
    extra = {"final_metrics": {"meta_loss": float("nan"), "step": 5.0}, "x": [1.0, float("inf")]}
    save_checkpoint(tmp_path / "ck", lopt, trained(lopt), extra_card=extra)
    card = card_of(tmp_path / "ck")
    assert card["final_metrics"] == {"meta_loss": None, "step": 5.0} and card["x"] == [1.0, None]
    assert card["non_finite"] == ["final_metrics.meta_loss", "x[1]"]
    load_checkpoint(tmp_path / "ck")


def test_update_card_adds_results_without_changing_the_identity(saved):
    base, _, _ = saved
    before = card_of(base)
    ckpt.update_card(base, {"eval": {"meta_loss": 0.25, "diverged": float("nan")}})
    after = card_of(base)
    assert after["eval"] == {"meta_loss": 0.25, "diverged": None}
    assert after["id"] == before["id"] and load_checkpoint(base)[2]["id"] == before["id"]
    with pytest.raises(CheckpointError, match="reserved"):
        ckpt.update_card(base, {"lopt": {}})


def test_writes_leave_no_temporary_files_and_remove_orphans(saved):
    base, lopt, meta = saved
    orphan = base.parent / f".{base.name}.json.abc123.tmp"
    orphan.write_text("left by a killed writer")
    save_checkpoint(base, lopt, meta)
    assert not list(base.parent.glob("*.tmp")) and not list(base.parent.glob(".*.tmp"))
