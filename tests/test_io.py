"""lowrank.save / lowrank.load: round trips, atomic writes, and errors that name the file and tensor."""

import copy
import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
from conftest import generator
from safetensors.torch import save_file
from test_compress import tiny

import lowrank
from lowrank.io import PLAN_NAME, WEIGHTS_NAME, load_pretrained, read_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def compressed_tiny():
    model = tiny()
    report = lowrank.compress(model, ratio=0.5, kinds=("linear", "conv", "embedding", "pointwise"),
                              progress=False)
    return model.eval(), report


def test_round_trip_into_a_fresh_model_is_bit_identical(tmp_path):
    model, report = compressed_tiny()
    lowrank.save(model, tmp_path / "out", report=report)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [PLAN_NAME, WEIGHTS_NAME]
    plan = json.loads((tmp_path / "out" / PLAN_NAME).read_text())
    assert plan["version"] == lowrank.__version__
    assert plan["modules"]["up"]["class"] == "LowRankLinear" and plan["modules"]["up"]["config"]["rank"] == 10
    assert plan["report"]["ratio"] == report.ratio

    reloaded = lowrank.load(tmp_path / "out", model=tiny(seed=99))
    assert [type(m) for m in reloaded.modules()] == [type(m) for m in model.modules()]
    idx = torch.randint(0, 50, (4, 9), generator=generator(0))
    assert torch.equal(reloaded(idx), model(idx))
    # the head was tied to the (now factorized) embedding: it keeps its own dense copy of the table
    assert torch.equal(reloaded.head.weight, model.head.weight)


def test_existing_target_is_refused_unless_overwrite(tmp_path):
    model, _ = compressed_tiny()
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        lowrank.save(model, target)
    assert (target / "keep.txt").read_text() == "mine"
    lowrank.save(model, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / WEIGHTS_NAME).is_file()


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model, _ = compressed_tiny()

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lowrank.io.save_model", broken)
    with pytest.raises(KeyboardInterrupt):
        lowrank.save(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_missing_plan_truncated_and_mismatched_files(tmp_path):
    model, _ = compressed_tiny()
    out = lowrank.save(model, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="lowrank.json"):
        lowrank.load(tmp_path, model=tiny())

    broken = tmp_path / "truncated"
    lowrank.save(model, broken)
    data = (broken / WEIGHTS_NAME).read_bytes()
    (broken / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        lowrank.load(broken, model=tiny())

    state = read_state_dict(out / WEIGHTS_NAME)
    state["up.first"] = torch.zeros(3, 3, dtype=torch.float64)
    save_file(state, str(out / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="'up.first' has shape \\(3, 3\\)"):
        lowrank.load(out, model=tiny())

    del state["up.first"]
    save_file(state, str(out / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="lacks tensor.*up.first"):
        lowrank.load(out, model=tiny())


def test_plan_naming_a_missing_module(tmp_path):
    model, _ = compressed_tiny()
    out = lowrank.save(model, tmp_path / "out")
    plan = json.loads((out / PLAN_NAME).read_text())
    plan["modules"]["nowhere"] = plan["modules"]["up"]
    (out / PLAN_NAME).write_text(json.dumps(plan))
    with pytest.raises(ValueError, match="'nowhere'"):
        lowrank.load(out, model=tiny())


class NotATensor:
    pass


def test_bin_files_are_read_without_unpickling_objects(tmp_path):
    state = {"w": torch.arange(4.0)}
    torch.save(state, tmp_path / "ok.bin")
    assert torch.equal(read_state_dict(tmp_path / "ok.bin")["w"], state["w"])
    with open(tmp_path / "evil.bin", "wb") as handle:
        pickle.dump({"w": NotATensor()}, handle)
    with pytest.raises(ValueError, match="evil.bin.*weights_only=True"):
        read_state_dict(tmp_path / "evil.bin")
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        read_state_dict(tmp_path / "absent.pt")


# ----------------------------------------------------------------------------- the bundled MiniLM


@pytest.fixture(scope="module")
def minilm():
    from minilm_task import checkpoint_dir, tokenizer

    return load_pretrained(checkpoint_dir()), tokenizer()


def test_minilm_compress_save_load_round_trip(tmp_path, minilm):
    dense, tok = minilm
    model = copy.deepcopy(dense)
    report = lowrank.compress(model, ratio=0.5, progress=False)
    replaced = {row.name for row in report.layers if row.replaced}
    # 6 layers x (query, key, value, attention output, intermediate, output), and the pooler
    assert len(replaced) == 37 and "pooler.dense" in replaced
    assert report.ratio <= 0.5
    out = lowrank.save(model, tmp_path / "minilm", report=report)
    for name in ("config.json", "tokenizer.json", "vocab.txt", WEIGHTS_NAME, PLAN_NAME):
        assert (out / name).is_file(), name
    reloaded = lowrank.load(out)
    assert type(reloaded).__name__ == "BertModel"
    batch = tok(["Low-rank factors make this model smaller.", "A second, longer sentence to pad."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.eval()(**batch).last_hidden_state
        assert torch.equal(reloaded(**batch).last_hidden_state, expected)
        dense_out = dense(**batch).last_hidden_state
        gentle = copy.deepcopy(dense)
        lowrank.compress(gentle, ratio=0.9, progress=False)
        gentle_out = gentle.eval()(**batch).last_hidden_state
    # keeping more parameters keeps the outputs closer to the dense model's
    assert rel(gentle_out, dense_out) < rel(expected, dense_out)


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))
