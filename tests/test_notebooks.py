"""The Colab demos run top to bottom on CPU (a failing cell fails the test), and are kept in
git without outputs."""

import json
import os
import time

import pytest

from tests.conftest import REPO

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = os.path.join(REPO, "experiments", "notebooks")
NAMES = ["quickstart.ipynb", "from_scratch.ipynb", "classification.ipynb",
         "instruction_preference.ipynb"]
# The CPU branch's training lengths, shortened for the test (every cell still runs, and the
# notebooks' own checks, e.g. "validation loss should fall", still hold): (text, replacement),
# each found exactly once, so a change to the notebook cannot silently skip this.
SHORTER = {
    "quickstart.ipynb": [("num_steps=150, global_batch_size=16, eval_every=50, "
                          "checkpoint_every=50",
                          "num_steps=20, global_batch_size=16, eval_every=10, "
                          "checkpoint_every=10")],
    "from_scratch.ipynb": [("num_steps=300 if backend", "num_steps=30 if backend")],
    "classification.ipynb": [("num_steps=300 if backend", "num_steps=60 if backend"),
                             ("range(1200)", "range(400)"), ("range(40)", "range(10)"),
                             ('"finetune.epochs": 3}', '"finetune.epochs": 1}')],
    "instruction_preference.ipynb": [("num_steps=300 if backend", "num_steps=100 if backend"),
                                     ("range(600)", "range(300)"),
                                     ("range(400)", "range(200)"),
                                     ('"finetune.epochs": 8 if backend',
                                      '"finetune.epochs": 3 if backend'),
                                     ('"finetune.epochs": 2,', '"finetune.epochs": 1,')],
}


@pytest.fixture
def data_dir(shared_data_dir):
  """The test run's prepared corpora and tokenizers (what a user's cache holds)."""
  return shared_data_dir


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs_and_has_a_colab_badge(name):
  with open(os.path.join(NOTEBOOKS, name)) as f:
    notebook = json.load(f)
  for cell in notebook["cells"]:
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None
  first = "".join(notebook["cells"][0]["source"])
  assert f"colab.research.google.com/github/jaxlm/jaxlm/blob/main/experiments/notebooks/{name}" \
      in first and "colab-badge.svg" in first
  assert "jax.default_backend()" in "".join("".join(c["source"]) for c in notebook["cells"])


@pytest.mark.e2e
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom_on_cpu(name, tmp_path, data_dir, monkeypatch):
  # The kernel is a child process: it inherits this environment. One CPU device (not the
  # test suite's 8 simulated ones), jaxlm importable from the checkout, a fresh working dir.
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("JAXLM_DATA_DIR", str(data_dir))
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws plots
  notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  for text, replacement in SHORTER[name]:
    cells = [c for c in notebook.cells if c.cell_type == "code" and text in c.source]
    assert len(cells) == 1 and cells[0].source.count(text) == 1, (name, text)
    cells[0].source = cells[0].source.replace(text, replacement)
  client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  start = time.time()
  client.execute()  # raises CellExecutionError naming the failing cell
  seconds = time.time() - start
  assert seconds < 300, f"{name} took {seconds:.0f} s; the budget is 5 minutes"
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any(o.output_type == "display_data" and "image/png" in o.data for o in outputs)
  assert os.path.isdir(tmp_path / "runs" / "quickstart") == (name == "quickstart.ipynb")
  for run in {"classification.ipynb": ["spam", "spam_lora"],
              "instruction_preference.ipynb": ["reverse", "dpo"]}.get(name, []):
    assert os.path.isfile(tmp_path / "runs" / run / "summary.json"), run
