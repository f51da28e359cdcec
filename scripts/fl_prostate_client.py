"""Client side of federated prostate training on NVIDIA FLARE: the script every site runs.

FLARE starts it (one process per site) from the job's ``custom`` folder; it trains with the
``prostate_mri_transfer`` bundle's own ``configs/train.json`` through MONAI's FL client for
bundles (:class:`monai.fl.client.MonaiAlgo`: a ``ConfigWorkflow`` whose trainer continues its
epoch count, and so its learning-rate schedule, across rounds), with the same preprocessing, N4
cache and loss as a central run. It reads only ``DATASET_DIR/<its site>`` and answers three
tasks of :class:`fl_prostate.ProstateFLController`: ``intensity_stats``, ``train`` and
``validate``. Only weights, pixel sums and metrics go back to the server.

Each round it loads the global weights, and (unless ``--keep_optimizer_state True``) starts the
optimizer afresh: Adam's moments from a local model that the global update has replaced would
push the new global weights the old local way.

Paths may be given by environment variables instead (a real site sets them; they win over the
arguments, which hold the paths of the machine that exported the job):
``PROSTATE_FL_BUNDLE_ROOT``, ``PROSTATE_FL_DATASET_DIR``, ``PROSTATE_FL_WORK_DIR`` and
``PROSTATE_FL_DATA_SITE`` (the site's folder under the dataset root, default its client name).

    python fl_prostate_client.py --bundle_root B --dataset_dir D --work_dir W --local_epochs 1 --rounds 2 \
        --image_size 64        # any further flag is a train.json override
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import fire

logger = logging.getLogger("prostate_fl.client")

ENV = {"bundle_root": "PROSTATE_FL_BUNDLE_ROOT", "dataset_dir": "PROSTATE_FL_DATASET_DIR",
       "work_dir": "PROSTATE_FL_WORK_DIR", "data_site": "PROSTATE_FL_DATA_SITE"}

#: train.json keys that federated training sets itself (see `fl_owned` in main)
FL_OWNED = ("bundle_root", "dataset_dir", "sites", "epochs", "resume", "compute_intensity_stats", "init_weights",
            "val_interval")


def _site_algo_class():
    from monai.fl.client import MonaiAlgo

    class SiteAlgo(MonaiAlgo):
        """MonaiAlgo validating with the training workflow's own ``validate#evaluator`` (the site's
        validation split) and, by default, with a fresh optimizer state every round."""

        def __init__(self, *args, keep_optimizer_state: bool = False, **kwargs):
            super().__init__(*args, config_evaluate_filename=None, **kwargs)
            self.keep_optimizer_state = keep_optimizer_state

        def initialize(self, extra=None):
            super().initialize(extra)
            parser = self.train_workflow.parser
            self.evaluator = parser.get_parsed_content("validate#evaluator")
            self.optimizer = parser.get_parsed_content("optimizer")
            self.dataset = parser.get_parsed_content("train#dataset")

        def train(self, data, extra=None):
            if not self.keep_optimizer_state:
                self.optimizer.state.clear()
            super().train(data, extra)

    return SiteAlgo


def _path(name: str, given: str | None) -> Path:
    value = os.environ.get(ENV[name]) or given
    if not value:
        raise SystemExit(f"fl_prostate_client: give --{name} or set {ENV[name]}")
    return Path(value).resolve()


def main(
    bundle_root: str | None = None,
    dataset_dir: str | None = None,
    work_dir: str | None = None,
    local_epochs: int = 1,
    rounds: int = 1,
    keep_optimizer_state: bool = False,
    data_site: str | None = None,
    threads: int = 0,
    **overrides,
) -> None:
    """Serve one site until the server ends the job.

    Args:
        bundle_root: the ``prostate_mri_transfer`` bundle folder (its configs and scripts).
        dataset_dir: the multi-site layout's root; only ``dataset_dir/<site>`` is read.
        work_dir: this site's outputs (``models/``, ``eval/``, N4 ``cache/``, ``fl_client.log``).
        local_epochs: epochs of local training per round.
        rounds: the job's rounds (the learning-rate schedule spans ``rounds * local_epochs`` epochs).
        keep_optimizer_state: keep Adam's moments from one round to the next.
        data_site: the site's folder under ``dataset_dir`` (default: the FLARE client name).
        threads: torch CPU threads (0: torch's default).
        overrides: further ``train.json`` overrides as their own flags, e.g. ``--image_size 64``.
    """
    clash = sorted(set(overrides) & set(FL_OWNED))
    if clash:
        raise SystemExit(f"fl_prostate_client: {clash} are set by federated training itself and cannot be overridden "
                         "(paths: --bundle_root/--dataset_dir/--work_dir; a start model: --initial_ckpt of the job)")
    # imported after the argument checks: a refused call returns at once
    import nvflare.client as flare
    import torch
    from monai.fl.utils.constants import ExtraItems
    from monai.fl.utils.exchange_object import ExchangeObject
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    if threads:
        torch.set_num_threads(int(threads))
    flare.init()
    site = flare.get_site_name()
    bundle, data, work = _path("bundle_root", bundle_root), _path("dataset_dir", dataset_dir), _path("work_dir", work_dir)
    work.mkdir(parents=True, exist_ok=True)
    # the site's own log (FLARE shows this process's output only on its console)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stdout), logging.FileHandler(work / "fl_client.log")])
    folder = os.environ.get(ENV["data_site"]) or data_site or site
    sys.path.insert(1, str(bundle))  # the bundle's own `scripts` package (scripts.net, scripts.data)
    from scripts.data import site_folder

    logger.info("site %s: reads only %s; outputs in %s", site, data / site_folder(folder), work)
    epochs = int(rounds) * int(local_epochs)
    fl_owned = {
        "bundle_root": str(work), "dataset_dir": str(data), "sites": [folder], "epochs": epochs,
        "resume": False,  # a round starts from the global model, never from a local checkpoint
        "compute_intensity_stats": False,  # the server sets the pooled statistics
        "init_weights": None,  # would overwrite the global weights at the first round (use --initial_ckpt)
        "val_interval": epochs + 1,  # validation is the server's `validate` task, on the global model
    }
    assert set(fl_owned) == set(FL_OWNED)
    train_overrides = {**overrides, **fl_owned}
    algo = _site_algo_class()(
        bundle_root=str(work), local_epochs=int(local_epochs), send_weight_diff=False,
        config_train_filename=str(bundle / "configs" / "train.json"), train_kwargs=train_overrides,
        keep_optimizer_state=bool(keep_optimizer_state),
    )
    algo.initialize({ExtraItems.CLIENT_NAME: site})
    n_slices = len(algo.dataset)
    logger.info("site %s: %d training slices", site, n_slices)
    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        task = flare.get_task_name()
        meta = {"site": site, "num_train_slices": n_slices}
        if task == "intensity_stats":
            sums = algo.dataset.intensity_sums()
            logger.info("site %s: intensity sums of its training slices %s", site, sums)
            params = {}
            if (received.meta or {}).get("send_weights"):
                params = {k: v.detach().cpu().numpy() for k, v in algo.trainer.network.state_dict().items()}
            flare.send(FLModel(params=params, params_type=ParamsType.FULL, meta={**meta, "intensity_sums": sums}))
        elif task == "train":
            algo.train(ExchangeObject(weights=received.params))
            weights = algo.get_weights().weights
            loss = algo.trainer.state.output
            metrics = {}
            if isinstance(loss, list) and loss and "loss" in loss[0]:
                metrics["train_loss"] = float(loss[0]["loss"])
            flare.send(FLModel(params={k: v.numpy() for k, v in weights.items()}, params_type=ParamsType.FULL,
                               metrics=metrics, meta=meta))
        elif task == "validate":
            result = algo.evaluate(ExchangeObject(weights=received.params))
            dice = {k: float(v) for k, v in result.metrics.items()}
            logger.info("site %s: round %s global model validation %s", site, received.current_round, dice)
            flare.send(FLModel(params={}, params_type=ParamsType.FULL, metrics=dice, meta=meta))
        else:
            raise ValueError(f"site {site}: unknown task '{task}'")
    algo.finalize()


if __name__ == "__main__":
    argv = sys.argv[1:]
    # with **overrides fire would take --help for an override
    fire.Fire(main, command=["--", "--help"] if {"-h", "--help"} & set(argv) else argv)
