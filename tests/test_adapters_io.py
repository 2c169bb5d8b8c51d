"""lowrank.adapters.save / load: lowrank's format for every adapter, PEFT's for LoRA both ways, the CLI.

PEFT itself is the reference for its format: our PEFT-format files are loaded with
``peft.PeftModel.from_pretrained`` and PEFT's own ``save_pretrained`` output is loaded here.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_adapters import CASES, FACTORIZED, Case, adapted, rel
from torch import nn
from transformers.pytorch_utils import Conv1D

import lowrank
import lowrank.adapters as adapters
from lowrank.adapters import FLoRA, LoRA
from lowrank.adapters.io import PEFT_CONFIG_NAME, PLAN_NAME, WEIGHTS_NAME
from lowrank.cli import main
from lowrank.nn import LowRankLinear


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": p for name, layer in adapters.adapter_layers(model).items()
            for key, p in layer.named_parameters() if not key.startswith("base_layer.")}


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]


FAN_IN_FAN_OUT = ".*fan_in_fan_out.*"  # PEFT's note on Conv1D and Linear side by side, which says nothing here


# ----------------------------------------------------------------------------- lowrank's format: every adapter


PISSA = [Case(f"pissa-{c.name.removeprefix('lora-')}", LoRA(rank=2, alpha=4, init="pissa"), c.layer, c.shape, c.kind,
              c.embedding) for c in CASES if c.name in ("lora-linear", "lora-hf-conv1d", "lora-embedding",
                                                        "lora-conv2d-grouped")]
FACTORIZED_CASES = [Case(f"{kind}-on-{name}", config, make, shape, layer_kind, layer_kind == "embedding")
                    for name, (make, shape, layer_kind) in FACTORIZED.items()
                    for kind, config in (("lora", LoRA(rank=2, alpha=4)), ("flora", FLoRA(rank=2, alpha=3)))
                    if not (layer_kind == "embedding" and kind == "flora")]
ROUND_TRIP = CASES + PISSA + FACTORIZED_CASES


@pytest.mark.parametrize("case", ROUND_TRIP, ids=[case.name for case in ROUND_TRIP])
def test_lowrank_format_round_trip_is_bit_identical(case: Case, tmp_path: Path) -> None:
    model, x = adapted(case), case.input()
    out = adapters.save(model, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == [PLAN_NAME, WEIGHTS_NAME]
    plan = json.loads((out / PLAN_NAME).read_text())
    entry = plan["adapters"]["layer"]
    assert entry["class"] == type(model.layer).__name__ and entry["config"] == case.config.to_dict()
    assert set(load_file(str(out / WEIGHTS_NAME))) == set(adapter_state(model))  # the adapter alone

    fresh = case.build()  # the original base (PiSSA's residual is recomputed from it)
    state = torch.random.get_rng_state()
    assert adapters.load(fresh, out) == ["layer"]
    assert torch.equal(torch.random.get_rng_state(), state)  # loading draws nothing from the global generator
    assert_same_state(fresh, model)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_per_layer_and_scheduled_ranks_and_a_merged_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Conv1d(10, 8, 5), nn.Tanh(), nn.Linear(6, 6))
    model = copy.deepcopy(base)
    adapters.add(model, LoRA(rank=4, alpha=8), include="0")
    adapters.add(model, FLoRA(rank=(3, 2, 2), alpha=5), kinds=("conv",))
    adapters.add(model, LoRA(rank=3, alpha=2, rslora=True), include="4")
    with torch.no_grad():
        for p in adapters.trainable_parameters(model):
            p.normal_()
        layer = model[0]  # a rank schedule that kept 2 of 4 components: smaller factors, the same scale
        layer.lora_A.weight = nn.Parameter(layer.lora_A.weight[:2].clone())
        layer.lora_B.weight = nn.Parameter(layer.lora_B.weight[:, :2].clone())
        adapters.merge(model)  # saving a merged model saves the factors
    x = torch.randn(2, 10, 12)
    out = adapters.save(model, tmp_path / "adapter")
    entries = json.loads((out / PLAN_NAME).read_text())["adapters"]
    assert entries["0"]["ranks"] == [2] and entries["0"]["config"]["rank"] == 4 and entries["0"]["scaling"] == 2.0
    assert entries["2"]["ranks"] == [3, 2, 2] and entries["4"]["ranks"] == [3]
    fresh = copy.deepcopy(base)
    assert adapters.load(fresh, out) == ["0", "2", "4"]
    assert fresh[0].lora_A.weight.shape == (2, 12) and fresh[0].scaling == 2.0
    assert not any(layer.merged for layer in adapters.adapter_layers(fresh).values())
    assert all(torch.equal(p, q) for p, q in zip(adapters.trainable_parameters(fresh),
                                                  adapters.trainable_parameters(model)))
    with torch.no_grad():
        merged = model(x)
        adapters.unmerge(model)
        assert torch.equal(fresh(x), model(x)) and rel(fresh(x), merged) < 1e-5


def test_whole_model_with_adapters_through_lowrank_save_and_load(tmp_path: Path) -> None:
    def build(seed: int) -> nn.Sequential:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.Flatten(),
                             nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4))

    model = build(0)
    lowrank.compress(model, rank=4, include="6", progress=False)
    adapters.add(model, LoRA(rank=2, alpha=4), include="6")  # on the LowRankLinear
    adapters.add(model, FLoRA(rank=3), kinds=("conv",))
    adapters.add(model, LoRA(rank=3, init="pissa"), include="4")  # the residual base is in the state dict
    with torch.no_grad():
        for p in adapters.trainable_parameters(model):
            p.add_(0.1 * torch.randn_like(p))
    out = lowrank.save(model, tmp_path / "full")
    plan = json.loads((out / "lowrank.json").read_text())
    assert list(plan["modules"]) == ["6.base_layer"] and list(plan["adapters"]) == ["0", "2", "4", "6"]
    fresh = lowrank.load(out, model=build(7))
    assert isinstance(fresh[6].base_layer, LowRankLinear) and isinstance(fresh[0], adapters.FLoRAConv)
    assert_same_state(fresh, model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    adapters.merge(model)
    with pytest.raises(ValueError, match=r"'0', '2', '4', '6' are merged.*unmerge"):
        lowrank.save(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


# ----------------------------------------------------------------------------- PEFT's format


class Small(nn.Module):
    """Embedding, Linear, Hugging Face Conv1D and Conv2d: every layer PEFT's LoRA and ours share."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.query, self.value = nn.Linear(16, 16), nn.Linear(16, 16)
        self.proj = Conv1D(16, 16)
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.out = nn.Linear(6 * 2 * 2, 5)

    def forward(self, i: torch.Tensor) -> torch.Tensor:
        h = self.emb(i)  # (batch, 4, 16)
        h = self.proj(torch.relu(self.query(h) + self.value(h)))
        return self.out(self.conv(h.reshape(-1, 4, 4, 4)).flatten(1))


TARGETS = ["emb", "query", "value", "proj", "conv"]


def small() -> Small:
    torch.manual_seed(0)
    return Small()


def ids() -> torch.Tensor:
    return torch.randint(0, 40, (3, 4), generator=torch.Generator().manual_seed(5))


def perturb(parameters: list[nn.Parameter], seed: int = 2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(0.2 * torch.randn(p.shape, generator=gen))


def test_ours_in_peft_format_loads_in_peft_with_equal_outputs(tmp_path: Path) -> None:
    base = small()
    model = copy.deepcopy(base)
    adapters.add(model, LoRA(rank=4, alpha=8), include=["emb", "query"], kinds=("linear", "embedding"))
    adapters.add(model, LoRA(rank=2, alpha=3), include=["value", "proj"])
    adapters.add(model, LoRA(rank=3, alpha=8), include="conv", kinds=("conv",))
    perturb(adapters.trainable_parameters(model))
    out = adapters.save(model, tmp_path / "peft", format="peft")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / PEFT_CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == TARGETS and config["fan_in_fan_out"] and config["use_rslora"] is False
    assert config["rank_pattern"] == {"value": 2, "proj": 2, "conv": 3}
    assert config["alpha_pattern"] == {"value": 3, "proj": 3}
    assert set(load_file(str(out / "adapter_model.safetensors"))) == {
        f"base_model.model.{key}" for key in adapter_state(model)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=FAN_IN_FAN_OUT)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out)
    with torch.no_grad():
        assert torch.equal(theirs(ids()), model(ids()))
    assert theirs.base_model.model.conv.scaling["default"] == 8 / 3  # the patterns reached PEFT
    mine = copy.deepcopy(base)
    assert adapters.load(mine, out) == TARGETS  # in the model's order
    with torch.no_grad():
        assert torch.equal(mine(ids()), model(ids()))


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_peft_saved_adapter_loads_here_with_equal_outputs(rslora: bool, tmp_path: Path) -> None:
    base = small()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=FAN_IN_FAN_OUT)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern={"query": 2, "conv": 3},
            alpha_pattern={"conv": 5, "emb": 3}, use_rslora=rslora, lora_dropout=0.1))
    perturb([p for n, p in theirs.named_parameters() if "lora_" in n])  # B non-zero
    theirs.save_pretrained(tmp_path / "theirs")
    mine = copy.deepcopy(base)
    assert adapters.load(mine, tmp_path / "theirs") == TARGETS
    assert mine.query.rank == 2 and mine.conv.rank == 3 and mine.emb.rank == 4
    assert mine.conv.config.alpha == 5 and mine.emb.config.alpha == 3 and mine.value.config.dropout == 0.1
    theirs.eval(), mine.eval()
    with torch.no_grad():
        assert torch.equal(mine(ids()), theirs(ids()))
    assert {n for n, p in mine.named_parameters() if p.requires_grad} == {
        n.replace("base_model.model.", "").replace(".default", "") for n, p in theirs.named_parameters()
        if p.requires_grad}
    # and back: what we write from it is what PEFT wrote
    adapters.save(mine, tmp_path / "again", format="peft")
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    saved = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)


def test_ambiguous_names_get_exact_patterns(tmp_path: Path) -> None:
    """"0" ends "1.0" too: the names PEFT matches by suffix become exact patterns."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 6), nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6)), nn.Linear(6, 3))
    model = copy.deepcopy(base)
    adapters.add(model, LoRA(rank=2, alpha=4), include="0")
    adapters.add(model, LoRA(rank=3, alpha=4), include="1.1")
    perturb(adapters.trainable_parameters(model))
    out = adapters.save(model, tmp_path / "peft", format="peft")
    config = json.loads((out / PEFT_CONFIG_NAME).read_text())
    assert config["target_modules"] == r"(?:0|1\.1)" and config["rank_pattern"] == {"1.1": 3}
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out)
    assert {n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A")} == {"0", "1.1"}
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(theirs(x), model(x))
    model = copy.deepcopy(base)
    adapters.add(model, LoRA(rank=2, alpha=4), include="1.*")
    adapters.add(model, LoRA(rank=3, alpha=4), include="0")
    config = json.loads((adapters.save(model, tmp_path / "p2", format="peft") / PEFT_CONFIG_NAME).read_text())
    assert config["r"] == 2 and config["rank_pattern"] == {"^0": 3}  # "0" alone would match "1.0" too
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p2")
    ranks = {n: m.r["default"] for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert ranks == {"0": 3, "1.0": 2, "1.1": 2}


def test_pissa_in_peft_format_recomputes_the_residual(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 6))
    model = copy.deepcopy(base)
    adapters.add(model, LoRA(rank=3, alpha=6, init="pissa"))
    perturb(adapters.trainable_parameters(model))
    out = adapters.save(model, tmp_path / "pissa", format="peft")
    assert json.loads((out / PEFT_CONFIG_NAME).read_text())["init_lora_weights"] == "pissa"
    x = torch.randn(4, 20)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out)  # PEFT's SVD: equal to rounding
    mine = copy.deepcopy(base)
    adapters.load(mine, out)
    with torch.no_grad():
        assert rel(theirs(x), model(x)) < 1e-5 and torch.equal(mine(x), model(x))


@pytest.mark.parametrize(("add", "message"), [
    (lambda m: adapters.add(m, FLoRA(rank=2), include="conv", kinds=("conv",)), "'conv' carries FLoRA"),
    (lambda m: adapters.add(m, LoRA(rank=1), include="grouped", kinds=("conv",)), "'grouped' is a Conv2d.*groups=2"),
    (lambda m: adapters.add(m, LoRA(rank=1), include="dilated", kinds=("conv",)), "'dilated'.*dilation=\\(2, 2\\)"),
    (lambda m: adapters.add(m, LoRA(rank=2), include="compressed"), "'compressed' is a LowRankLinear"),
    (lambda m: (adapters.add(m, LoRA(rank=2), include="query"),
                adapters.add(m, LoRA(rank=2, rslora=True), include="value")), "one use_rslora.*'query': False"),
], ids=["flora", "grouped-conv", "dilated-conv", "factorized", "mixed-rslora"])
def test_what_peft_cannot_hold_is_refused(add, message: str, tmp_path: Path) -> None:
    model = small()
    model.grouped = nn.Conv2d(4, 4, 3, groups=2)
    model.dilated = nn.Conv2d(4, 4, 3, dilation=2)
    model.compressed = LowRankLinear.from_dense(nn.Linear(8, 8), rank=3)
    add(model)
    with pytest.raises(ValueError, match=message) as info:
        adapters.save(model, tmp_path / "peft", format="peft")
    assert "format='lowrank'" in str(info.value)
    assert list(tmp_path.iterdir()) == []
    adapters.save(model, tmp_path / "ours")  # lowrank's format holds it


def test_peft_convolutions_lowrank_reads_differently(tmp_path: Path) -> None:
    """PEFT's grouped-conv LoRA (one dense lora_A) has no equivalent here; on a dilated conv PEFT ignores dilation."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, dilation=2))
    for target, directory in (("0", "grouped"), ("1", "dilated")):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*groups > 1.*")
            theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=[target]))
        theirs.save_pretrained(tmp_path / directory)
    with pytest.raises(ValueError, match="layer '0' is a Conv2d.*groups=2: PEFT's LoRA on a grouped convolution"):
        adapters.load(copy.deepcopy(base), tmp_path / "grouped")
    with pytest.warns(UserWarning, match=r"'1' is a Conv2d.*dilation=\(2, 2\).*PEFT issue #3697"):
        assert adapters.load(copy.deepcopy(base), tmp_path / "dilated") == ["1"]


# ----------------------------------------------------------------------------- errors


def test_wrong_base_is_named_and_leaves_the_model_unchanged(tmp_path: Path) -> None:
    model = small()
    adapters.add(model, LoRA(rank=2), include=["query", "value"])
    ours = adapters.save(model, tmp_path / "ours")
    theirs = adapters.save(model, tmp_path / "peft", format="peft")

    other = small()
    other.value = nn.Linear(16, 24)
    flags = [p.requires_grad for p in other.parameters()]
    with pytest.raises(ValueError, match=r"layer 'value' of the model is a Linear with weight shape \(24, 16\), but "
                                         r"the adapter was made for a Linear with weight shape \(16, 16\)"):
        adapters.load(other, ours)
    with pytest.raises(ValueError, match=r"'base_model.model.value.lora_B.weight' has shape \(16, 2\).*'value'.*"
                                         r"\(24, 16\)\) takes \(24, 2\)"):
        adapters.load(other, theirs)
    assert not adapters.adapter_layers(other) and [p.requires_grad for p in other.parameters()] == flags

    del other.query
    for directory in (ours, theirs):
        with pytest.raises(ValueError, match="adapts layer 'query', which the Small does not have"):
            adapters.load(other, directory)
    with pytest.raises(ValueError, match="'query' of the Small carries an adapter already"):
        adapters.load(model, ours)


def test_bad_files(tmp_path: Path) -> None:
    model = small()
    adapters.add(model, LoRA(rank=2), include="query")
    with pytest.raises(FileNotFoundError, match="neither lowrank_adapters.json.*nor adapter_config.json"):
        adapters.load(small(), tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        adapters.load(small(), tmp_path / "nowhere")
    peft_dir = adapters.save(model, tmp_path / "peft", format="peft")
    config = json.loads((peft_dir / PEFT_CONFIG_NAME).read_text())

    (peft_dir / PEFT_CONFIG_NAME).write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type 'IA3' is not supported"):
        adapters.load(small(), peft_dir)
    (peft_dir / PEFT_CONFIG_NAME).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True"):
        adapters.load(small(), peft_dir)
    (peft_dir / PEFT_CONFIG_NAME).write_text(json.dumps({**config, "rank_pattern": {"query": 3}}))
    with pytest.raises(ValueError, match="has rank 2, but adapter_config.json gives r=3 for module 'query'"):
        adapters.load(small(), peft_dir)
    (peft_dir / PEFT_CONFIG_NAME).write_text(json.dumps(config))
    tensors = load_file(str(peft_dir / "adapter_model.safetensors"))
    save_file({**tensors, "base_model.model.query.lora_magnitude_vector": torch.ones(16)},
              str(peft_dir / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="'base_model.model.query.lora_magnitude_vector' is not a LoRA factor"):
        adapters.load(small(), peft_dir)
    (peft_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors not found"):
        adapters.load(small(), peft_dir)

    ours = adapters.save(model, tmp_path / "ours")
    save_file({}, str(ours / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="lacks the adapter tensor.*'query.lora_A.weight'"):
        adapters.load(small(), ours)
    (ours / PLAN_NAME).write_text("{")
    with pytest.raises(ValueError, match="lowrank_adapters.json is not valid JSON"):
        adapters.load(small(), ours)
    with pytest.raises(ValueError, match="format must be one of 'lowrank', 'peft'"):
        adapters.save(model, tmp_path / "x", format="torch")
    with pytest.raises(ValueError, match="no adapter layers"):
        adapters.save(small(), tmp_path / "x")


def test_interrupted_save_leaves_no_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = small()
    adapters.add(model, LoRA(rank=2), include="query")

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("lowrank.adapters.io.save_file", broken)
    for format in ("lowrank", "peft"):
        with pytest.raises(KeyboardInterrupt):
            adapters.save(model, tmp_path / "adapter", format=format)
        assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    target = tmp_path / "adapter"
    target.mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        adapters.save(model, target)
    adapters.save(model, target, overwrite=True)
    assert (target / PLAN_NAME).is_file()


# ----------------------------------------------------------------------------- the CLI


def minilm_with_lora(minilm_dir: str) -> nn.Module:
    model = lowrank.io.load_pretrained(minilm_dir)
    adapters.add(model, LoRA(rank=4, alpha=8), include=["*query", "*value"])
    perturb(adapters.trainable_parameters(model))
    return model


def test_cli_merges_an_adapter_into_the_hugging_face_base(minilm_dir: str, tmp_path: Path, capsys) -> None:
    import transformers

    model = minilm_with_lora(minilm_dir)
    adapter = adapters.save(model, tmp_path / "adapter", format="peft")
    out = tmp_path / "merged"
    assert main(["adapters", "merge", minilm_dir, str(adapter), "-o", str(out)]) == 0, capsys.readouterr().err
    assert "merged 12 adapted layers" in capsys.readouterr().out
    assert (out / "config.json").is_file() and (out / "vocab.txt").is_file() and (out / "model.safetensors").is_file()
    merged = transformers.AutoModel.from_pretrained(out).eval()
    x = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=x).last_hidden_state
        assert rel(merged(input_ids=x).last_hidden_state, expected) < 1e-5
        assert rel(lowrank.io.load_pretrained(minilm_dir)(input_ids=x).last_hidden_state, expected) > 1e-2

    assert main(["adapters", "merge", minilm_dir, str(adapter), "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    wrong = small()
    adapters.add(wrong, LoRA(rank=2), include="query")
    adapters.save(wrong, tmp_path / "wrong")
    assert main(["adapters", "merge", minilm_dir, str(tmp_path / "wrong"), "-o", str(tmp_path / "no")]) == 2
    assert "adapts layer 'query', which the BertModel does not have" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_cli_merges_into_a_lowrank_checkpoint(minilm_dir: str, tmp_path: Path, capsys) -> None:
    model = lowrank.io.load_pretrained(minilm_dir)
    lowrank.compress(model, rank=16, include="encoder.layer.0.attention.self.*", progress=False)
    base = lowrank.save(model, tmp_path / "compressed")
    adapters.add(model, LoRA(rank=2, alpha=4), include="encoder.layer.0.attention.self.*")  # on LowRankLinear
    perturb(adapters.trainable_parameters(model))
    adapter = adapters.save(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["adapters", "merge", str(base), str(adapter), "-o", str(out)]) == 0, capsys.readouterr().err
    merged = lowrank.load(out)
    query = merged.encoder.layer[0].attention.self.query
    assert type(query) is LowRankLinear and query.rank == 18
    x = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel(merged(input_ids=x).last_hidden_state, model(input_ids=x).last_hidden_state) < 1e-5


def test_cli_info_on_adapter_directories(tmp_path: Path, capsys) -> None:
    model = small()
    adapters.add(model, LoRA(rank=4, alpha=8), include=["query", "emb"], kinds=("linear", "embedding"))
    adapters.add(model, FLoRA(rank=2, alpha=3), include="conv", kinds=("conv",))
    ours = adapters.save(model, tmp_path / "ours")
    assert main(["info", str(ours)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("lowrank adapter, 3 adapted modules, 400 trainable parameters")  # 224 + 128 + 48
    assert lines[1].split() == ["module", "adapter", "rank", "alpha", "trainable"]
    assert lines[2].split() == ["emb", "LoRAEmbedding", "4", "8", "224"]
    assert lines[4].split() == ["conv", "FLoRAConv", "[2,", "2,", "2,", "2]", "3", "48"]

    del model.conv
    peft_dir = adapters.save(model, tmp_path / "peft", format="peft")
    assert main(["info", str(peft_dir)]) == 0
    printed = capsys.readouterr().out
    assert "PEFT LoRA adapter, 2 adapted modules, 352 trainable parameters" in printed
    assert main(["info", str(peft_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "peft" and summary["config"]["peft_type"] == "LORA"
    assert {row["module"]: row["adapter"] for row in summary["adapters"]} == {
        "emb": "LoRAEmbedding", "query": "LoRALinear"}

    model = small()
    adapters.add(model, LoRA(rank=2), include="query")
    full = lowrank.save(model, tmp_path / "full")
    assert main(["info", str(full)]) == 0
    assert "0 factorized modules, 1 adapters" in capsys.readouterr().out
