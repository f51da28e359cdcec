"""``python -m monai.bundle run training ... --tracking mlflow`` for every bundle (the `mlflow` extra).

One tiny epoch per bundle on phantoms; the run must land in MONAI's default local store
(``<output_dir>/mlruns.db``, SQLite: MLflow >= 3.13 refuses the plain file store) with the
training loss and the validation metric logged.
"""

from __future__ import annotations

import pytest
from helpers import bundle_run, make_phantoms
from monai.utils import path_to_sqlite_uri

mlflow = pytest.importorskip("mlflow", reason="needs the mlflow extra: pip install -e .[mlflow]")

#: bundle -> (phantom kind, phantom options, training overrides); one epoch, smallest sizes
RUNS = {
    "prostate_mri_transfer": ("prostate", {"cases_per_site": 6, "shape": "(64,64,10)"},
                              {"sites": ["RUNMC"], "image_size": 64, "encoder": "efficientnet-b0", "batch_size": 8}),
    "liver_ct_mri_transfer": ("liver_mri", {"cases": 10, "shape": "(64,52,8)"},
                              {"image_size": 64, "channels": [8, 16, 32, 64], "batch_size": 8}),
    # tracking is independent of distillation: the student trains without a teacher checkpoint
    "polyp_kdas_student": ("polyp", {"train": 12, "per_test_set": 1, "size": 64},
                           {"kd": "none", "image_size": 64, "size_multiple": 16, "batch_size": 8}),
    "cardiac_qc_refinement": ("cardiac", {"subjects": 6, "ood_subjects": 1, "sa_shape": "(64,64,4)"},
                              {"image_size": 64, "filters": [8, 16, 32, 64], "deep_supr_num": 2, "batch_size": 8}),
}


@pytest.mark.slow
@pytest.mark.parametrize("bundle", sorted(RUNS))
def test_training_logs_to_local_mlflow_store(bundle, tmp_path):
    kind, phantom_options, overrides = RUNS[bundle]
    data = make_phantoms(kind, tmp_path / "data", cwd=tmp_path, **phantom_options)
    work = tmp_path / "work"
    bundle_run(bundle, ["train.json"], cwd=tmp_path, run_id="training", tracking="mlflow", bundle_root=str(work),
               dataset_dir=str(data), epochs=1, val_interval=1, resume=False, **overrides)

    store = work / "eval" / "mlruns.db"
    assert store.is_file(), f"no MLflow store at {store}"
    client = mlflow.tracking.MlflowClient(tracking_uri=path_to_sqlite_uri(str(store)))
    experiment = client.get_experiment_by_name("monai_experiment")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    metrics = runs[0].data.metrics
    assert "train_loss" in metrics and metrics["train_loss"] == metrics["train_loss"], metrics  # logged and not NaN
    assert any(k.startswith("val_") for k in metrics), f"no validation metric logged: {sorted(metrics)}"
    history = client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert len(history) >= 1
