"""The notebooks under ``notebooks/`` are part of the suite: each one is executed, cell by cell.

Every ``notebooks/*.ipynb`` is run with nbclient on an ipykernel ``python3`` kernel of this very
interpreter, in ``notebooks/`` and with this checkout's ``lowrank`` first on the path; a cell that
raises fails the test with the cell's error. nbclient, nbformat and ipykernel are in the ``test``
extra, so a missing one is a failure, not a skip. Where it is cheap, what a notebook printed is
checked as well (against closed forms or an independent library, not against itself).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 120  # seconds per cell; the notebooks use small inputs and take a few seconds in all
ANSI_COLOR = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        pytest.fail(
            f"running the notebooks needs {module} (it is in the test extra: pip install -e '.[test]'): {error}",
            pytrace=False,
        )


def _execute(path: Path, kernel_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """Run every cell of the notebook at ``path``; return the executed notebook."""
    nbformat = _require("nbformat")
    nbclient = _require("nbclient")
    kernelspec = _require("ipykernel.kernelspec")
    manager = _require("jupyter_client.manager")
    specs = _require("jupyter_client.kernelspec")
    # A python3 kernel spec that starts sys.executable, so that no python3 kernel installed elsewhere
    # (another environment's) is picked up; the kernel imports this checkout's lowrank.
    kernelspec.write_kernel_spec(kernel_dir / "python3")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    km = manager.AsyncKernelManager(
        kernel_name="python3", kernel_spec_manager=specs.KernelSpecManager(kernel_dirs=[str(kernel_dir)])
    )
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, km=km, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(NOTEBOOK_DIR)}}
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:  # the cell's source and traceback
        pytest.fail(f"{path.name}: a cell raised\n{ANSI_COLOR.sub('', str(error))}", pytrace=False)
    except nbclient.exceptions.CellTimeoutError as error:
        pytest.fail(f"{path.name}: a cell ran past {CELL_TIMEOUT} s\n{error}", pytrace=False)
    assert km.kernel_spec.argv[0] == sys.executable
    return notebook


def _stdout(notebook) -> str:
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream" and output.name == "stdout"
    )


def _check_decompose_tour(text: str) -> None:
    # "lowrank  tucker params   992  error 0.9...": every method, its size and its error
    lines = re.findall(r"^lowrank\s+(\w+)\s+params\s+(\d+)\s+error\s+([0-9.]+)$", text, re.MULTILINE)
    found = {method: (int(params), float(error)) for method, params, error in lines}
    assert set(found) == {"tucker", "cp", "tt", "tr"}, text
    n, rank = 20, 8  # the tour's 20 x 20 x 20 tensor; TR uses rank 4
    assert found["tucker"][0] == rank**3 + 3 * n * rank  # the core and three factors
    assert found["cp"][0] in (3 * n * rank, 3 * n * rank + rank)  # three factors, with or without weights
    assert found["tt"][0] == n * rank + rank * n * rank + rank * n  # cores (1, n, r), (r, n, r), (r, n, 1)
    assert found["tr"][0] == 3 * 4 * n * 4  # three cores (4, n, 4)
    # a Gaussian tensor has no low-rank structure: some error remains, and no method does worse than zero
    for method, (_, error) in found.items():
        assert 0.0 < error < 1.0, (method, error)
    reference = dict(re.findall(r"^tensorly\s+(\w+)\s+error\s+([0-9.]+)$", text, re.MULTILINE))
    assert set(reference) == {"tucker", "cp", "tt"}, text
    # TT-SVD at fixed ranks is the same deterministic algorithm in both libraries: the same error
    assert abs(found["tt"][1] - float(reference["tt"])) <= 2e-4, (found["tt"], reference["tt"])
    svd = re.search(r"^svd\s+rank\s+(\d+)\s+error\s+([0-9.]+)\s+\(tol 0\.5\)$", text, re.MULTILINE)
    assert svd is not None, text
    assert 1 <= int(svd[1]) <= 120 and float(svd[2]) <= 0.5  # within the tolerance asked for


def _check_train_lowrank(text: str) -> None:
    found = {name: (float(accuracy), int(params.replace(",", ""))) for name, accuracy, params in re.findall(
        r"^(dense|TRP|scheduler): accuracy ([0-9.]+), parameters ([0-9,]+)", text, re.MULTILINE)}
    assert set(found) == {"dense", "TRP", "scheduler"}, text
    dense_accuracy, dense_params = found["dense"]
    assert dense_accuracy > 0.9
    assert found["TRP"][1] < dense_params and found["scheduler"][1] < dense_params
    # the scheduler ends within its budget: the hidden layers at 40% of (64*128 + 128) + (128*128 + 128)
    assert found["scheduler"][1] <= int(0.4 * (64 * 128 + 128 + 128 * 128 + 128)) + 128 * 10 + 10
    assert all(accuracy > dense_accuracy - 0.1 for accuracy, _ in found.values())
    history = re.search(r"rank history: TRP (\d+) truncations, scheduler (\d+) mask updates", text)
    assert history is not None and int(history[1]) > 10 and int(history[2]) > 10, text


# all-MiniLM-L6-v2's linear layers: per block query, key, value and attention output (384 -> 384), intermediate
# (384 -> 1536) and output (1536 -> 384); six blocks. LoRA at rank r trains r (in + out) on each.
MINILM_LINEARS = 6 * 6
MINILM_IN_PLUS_OUT = 6 * (4 * (384 + 384) + (384 + 1536) + (1536 + 384))


def _check_adapters(text: str) -> None:
    pattern = r"^(LoRA|FLoRA): rank (\d+) on (\d+) layers, ([0-9,]+) trainable parameters"
    found = {label: (int(rank), int(layers), int(params.replace(",", "")))
             for label, rank, layers, params in re.findall(pattern, text, re.MULTILINE)}
    assert set(found) == {"LoRA", "FLoRA"}, text
    for label, (rank, layers, params) in found.items():
        assert layers == MINILM_LINEARS, (label, layers)
        core = layers * rank**2 if label == "FLoRA" else 0  # FLoRA's r x r core per layer, beside its two factors
        assert params == rank * MINILM_IN_PLUS_OUT + core, (label, params)
    losses = {label: (float(step1), float(first), float(last)) for label, step1, first, last in re.findall(
        r"^(LoRA|FLoRA): loss at step 1 ([0-9.]+) .*, mean of the first 5 ([0-9.]+), of the last 5 ([0-9.]+)$",
        text, re.MULTILINE)}
    assert set(losses) == {"LoRA", "FLoRA"}, text
    for label, (step1, first, last) in losses.items():
        assert abs(step1 - math.log(8)) < 1e-3, (label, step1)  # the head starts at zero: uniform over 8 packages
        assert last < 0.75 * first, (label, first, last)  # the loss falls
    accuracies = [float(a) for a in re.findall(r"^(?:LoRA|FLoRA): held-out accuracy ([0-9.]+)", text, re.MULTILINE)]
    assert len(accuracies) == 2 and all(0.25 < a <= 1 for a in accuracies), accuracies  # chance is 0.125
    merges = re.findall(r"^(LoRA|FLoRA): merged vs unmerged: max \|difference\| ([0-9.e+-]+); the adapter moved the "
                        r"embeddings by up to ([0-9.]+)$", text, re.MULTILINE)
    assert {label for label, _, _ in merges} == {"LoRA", "FLoRA"}, text
    for label, difference, moved in merges:  # merging changes nothing but float32 rounding of an update that matters
        assert float(difference) < 1e-4 and float(moved) > 1e-2, (label, difference, moved)
    assert text.count("unmerge restores every base weight bit for bit: True; disabled gives the base outputs bit for "
                      "bit: True") == 2, text
    saved = {label: (fmt, files, int(modules), int(params.replace(",", "")), same) for label, fmt, files, modules,
             params, same in re.findall(r"^(LoRA|FLoRA): (\w+) format, files \[(.*)\], (\d+) modules, ([0-9,]+) "
                                        r"parameters; reloaded: bit-identical (\w+)$", text, re.MULTILINE)}
    assert saved["LoRA"][:2] == ("peft", "'adapter_config.json', 'adapter_model.safetensors'"), saved
    assert saved["FLoRA"][:2] == ("lowrank", "'lowrank_adapters.json', 'lowrank_adapters.safetensors'"), saved
    for label, (_, _, modules, params, same) in saved.items():  # the files hold what was trained, and load back
        assert (modules, params, same) == (MINILM_LINEARS, found[label][2], "True"), (label, saved[label])
    assert text.count("0 adapters left, the first query is a plain nn.Linear again: True") == 2, text
    assert "FLoRA in PEFT's format: refused" in text and "carries FLoRA, which PEFT does not have" in text, text


def _check_compress_checkpoint(text: str) -> None:
    found = re.search(r"^calibrated ratio 0.5: kept ([0-9.]+), (\d+) of (\d+) layers with a spectrum, mean cosine "
                      r"([0-9.]+)$", text, re.MULTILINE)
    assert found is not None, text
    kept, recorded, layers, cosine = float(found[1]), int(found[2]), int(found[3]), float(found[4])
    assert 0.49 <= kept <= 0.5 and recorded == layers == MINILM_LINEARS, found[0]
    curves = {label: {float(r): float(c) for r, c in re.findall(r"ratio ([0-9.]+) cosine ([0-9.]+)", line)}
              for label, line in re.findall(r"^(plain SVD|calibrated): (.*)$", text, re.MULTILINE)}
    assert list(curves["plain SVD"]) == [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], text
    plain = list(curves["plain SVD"].values())
    assert all(later <= earlier + 1e-3 for earlier, later in zip(plain, plain[1:])), plain  # fewer kept, further off
    assert curves["calibrated"][0.5] == cosine and 0 < cosine < 1
    for ratio, calibrated in curves["calibrated"].items():  # held-out text of the calibration's own domain
        assert calibrated > curves["plain SVD"][ratio], (ratio, calibrated, curves["plain SVD"][ratio])
    assert "lowrank info returned 0; the PNG starts with b'\\x89PNG\\r\\n\\x1a\\n'" in text, text


# What a notebook prints, checked where that is cheap (notebooks not listed get the generic checks).
OUTPUT_CHECKS: dict[str, Callable[[str], None]] = {
    "adapters.ipynb": _check_adapters,
    "compress_checkpoint.ipynb": _check_compress_checkpoint,
    "decompose_tour.ipynb": _check_decompose_tour,
    "train_lowrank.ipynb": _check_train_lowrank,
}


def test_notebooks_are_found():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"
    assert set(OUTPUT_CHECKS) <= {path.name for path in NOTEBOOKS}


@pytest.mark.parametrize("name", [path.name for path in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(name):
    notebook = json.loads((NOTEBOOK_DIR / name).read_text(encoding="utf-8"))
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "clear the outputs before committing"


@pytest.mark.parametrize("name", [path.name for path in NOTEBOOKS])
def test_notebook_runs(name, tmp_path, monkeypatch):
    notebook = _execute(NOTEBOOK_DIR / name, tmp_path / "kernels", monkeypatch)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, f"{name} has no code cells"
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))  # every cell ran, in order
    for cell in code:
        assert not [output for output in cell.outputs if output.output_type == "error"], cell.source
    if name in OUTPUT_CHECKS:
        OUTPUT_CHECKS[name](_stdout(notebook))


def test_notebooks_are_lint_clean():
    # the test command lints what it runs: ruff with the project's settings (pyproject.toml), as CI does
    result = subprocess.run([sys.executable, "-m", "ruff", "check", *map(str, NOTEBOOKS)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
