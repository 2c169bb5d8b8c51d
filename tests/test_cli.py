import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lowrank.cli import main


@pytest.fixture
def low_rank_npy(tmp_path):
    gen = np.random.default_rng(0)
    factors = [gen.standard_normal((n, 2)) for n in (6, 7, 8)]
    x = np.einsum("ia,jb,kc,abc->ijk", *factors, gen.standard_normal((2, 2, 2)))
    path = tmp_path / "x.npy"
    np.save(path, x)
    return path


def test_decompose_npy_reports_the_factorization(low_rank_npy, capsys):
    assert main(["decompose", str(low_rank_npy), "--method", "tucker", "--rank", "2,2,2"]) == 0
    out = capsys.readouterr().out
    assert "Tucker(shape=(6, 7, 8), ranks=(2, 2, 2)" in out
    error = float(out.rsplit("relative error:", 1)[1])
    assert error < 1e-6


def test_decompose_searches_a_network_with_only_a_tolerance(low_rank_npy, capsys):
    # the planted Tucker comes back as its Tucker network: the search's one internal core
    assert main(["decompose", str(low_rank_npy), "--method", "tn", "--tol", "1e-6"]) == 0
    out = capsys.readouterr().out
    assert "TensorNetwork(shape=(6, 7, 8)" in out and "num_params=50" in out  # 2 * (6 + 7 + 8) + 2**3
    assert float(out.rsplit("relative error:", 1)[1]) < 1e-6


def test_decompose_safetensors_key(tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    save_file({"layer.weight": torch.randn(12, 10)}, str(path))
    assert main(["decompose", str(path), "--key", "layer.weight", "--method", "svd", "--rank", "10"]) == 0
    assert float(capsys.readouterr().out.rsplit("relative error:", 1)[1]) < 1e-5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "tucker", "--rank", "9"], "rank for mode 0 (size 6) must be at most 6, got 9"),
        (["--method", "tt", "--tol", "1.5"], "tol must be a relative error in the open interval (0, 1), got 1.5"),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(low_rank_npy, capsys, args, message):
    assert main(["decompose", str(low_rank_npy), *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_file_and_key(tmp_path, capsys):
    assert main(["decompose", str(tmp_path / "none.npy"), "--method", "svd", "--rank", "1"]) == 2
    assert "no such file" in capsys.readouterr().err
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(3, 3)}, str(path))
    assert main(["decompose", str(path), "--key", "b", "--method", "svd", "--rank", "1"]) == 2
    assert "'b' is not a tensor" in capsys.readouterr().err


# ----------------------------------------------------------------------------- compress / info


def test_compress_and_info_on_the_bundled_checkpoint(minilm_dir, tmp_path, capsys):
    import json

    import lowrank

    out = tmp_path / "small"
    code = main(["compress", minilm_dir, "-o", str(out), "--ratio", "0.3", "--targets", "encoder.*",
                 "--exclude", "*.attention.*", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert f"saved to {out}" in capsys.readouterr().out
    plan = json.loads((out / "lowrank.json").read_text())
    names = set(plan["modules"])
    assert len(names) == 12 and all(".attention." not in n and n.startswith("encoder.") for n in names)
    assert all(entry["class"] == "LowRankLinear" for entry in plan["modules"].values())
    assert plan["report"]["ratio"] <= 0.3

    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "12 factorized modules" in printed and "encoder.layer.0.intermediate.dense" in printed
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["modules"] == plan["modules"]

    model = lowrank.load(out)
    assert type(model.encoder.layer[5].output.dense).__name__ == "LowRankLinear"


def test_compress_refuses_an_existing_output_and_bad_sources(minilm_dir, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert main(["compress", minilm_dir, "-o", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert list(out.iterdir()) == []
    assert main(["compress", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x"), "--quiet"]) == 2
    assert "nowhere is not a checkpoint directory" in capsys.readouterr().err
    assert main(["compress", minilm_dir, "-o", str(tmp_path / "y"), "--method", "linear=cp", "--quiet"]) == 2
    assert "method for linear layers must be one of" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    assert main(["info", str(tmp_path)]) == 2
    assert "lowrank.json" in capsys.readouterr().err


def test_compress_with_calibration_text_and_a_rank_policy(minilm_dir, tmp_path, capsys):
    import json

    calibration = tmp_path / "calib.txt"
    calibration.write_text("The for statement iterates over a sequence.\n\nA function returns a value.\n" * 4)
    out = tmp_path / "calibrated"
    code = main(["compress", minilm_dir, "-o", str(out), "--ratio", "0.8", "--targets", "encoder.layer.0.*",
                 "--calibration", str(calibration), "--allocation", "energy", "--batch-size", "3", "--shrinkage", "0.2",
                 "--refit",
                 "--ridge", "0.5", "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "lowrank.json").read_text())["report"]
    assert report["settings"]["calibration"]["allocation"] == "energy" and report["settings"]["calibration"]["whiten"]
    assert (report["settings"]["calibration"]["shrinkage"], report["settings"]["calibration"]["ridge"]) == (0.2, 0.5)
    assert report["settings"]["calibration"]["refit"] is True
    assert report["settings"]["calibration"]["batches"] == 3  # 8 lines, 3 per batch
    assert report["ratio"] <= 0.8
    assert all(row["output_error"] is not None for row in report["layers"] if row["skip_reason"] is None)

    out = tmp_path / "vbmf"
    assert main(["compress", minilm_dir, "-o", str(out), "--rank", "vbmf,max=64", "--targets", "encoder.layer.0.*",
                 "--quiet"]) == 0
    report = json.loads((out / "lowrank.json").read_text())["report"]
    assert report["settings"]["rank"] == "vbmf,max=64"
    assert all(row["rank"] <= 64 for row in report["layers"] if row["skip_reason"] is None)

    with pytest.raises(SystemExit) as exit_info:  # argparse rejects the policy before anything runs
        main(["compress", minilm_dir, "-o", str(tmp_path / "bad"), "--rank", "energy:2", "--quiet"])
    assert exit_info.value.code == 2
    assert "argument --rank: energy must be a fraction in (0, 1], got 2.0" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["compress", minilm_dir, "-o", str(tmp_path / "bad2"), "--calibration", str(empty), "--quiet"]) == 2
    assert "has no non-empty line" in capsys.readouterr().err
    assert not (tmp_path / "bad2").exists()


def test_calibration_options_without_calibration_are_refused(minilm_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", minilm_dir, "-o", str(out), "--allocation", "energy", "--no-refit", "--quiet"]) == 2
    assert "--allocation, --refit/--no-refit need --calibration FILE.txt" in capsys.readouterr().err
    assert main(["compress", minilm_dir, "-o", str(out), "--heal-steps", "3", "--quiet"]) == 2
    assert "healing needs calibration data" in capsys.readouterr().err
    assert not out.exists()
