"""task=classification: labels from the data, accuracy + macro-F1, LoRA on the embedded MiniLM."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import cli_in_process, shared
from tuneforge.tasks.classification import classification_metrics, label_names


def test_label_names_and_metrics_on_a_tiny_set():
    assert label_names(["pos", "neg", "pos"]) == ["neg", "pos"]
    assert label_names([1, 0, 2]) == ["0", "1", "2"]
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 2.0]])  # predicts 0, 1, 0, 1
    labels = np.array([0, 1, 1, 1])
    m = classification_metrics((logits, labels))
    assert m["accuracy"] == pytest.approx(0.75)
    # class 0: P=1/2 R=1 F1=2/3; class 1: P=1 R=2/3 F1=0.8 -> macro 0.7333
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


@pytest.mark.slow
def test_sst2_fine_tune_beats_majority_baseline(tmp_path):
    tsv = shared("sst2_dev.tsv")
    run_dir = tmp_path / "run"
    result = cli_in_process(
        "train", "recipe=classify-demo", f"data.path={tsv}", "data.split='train[:400]'", "data.eval_fraction=0.25",
        "format.text_column=content", "train.num_train_epochs=3", "train.max_length=48", f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["labels"] == ["0", "1"] and metrics["eval_rows"] == 100
    assert metrics["eval_accuracy"] > metrics["majority_baseline_accuracy"]
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
