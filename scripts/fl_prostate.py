"""Server side of federated prostate training on NVIDIA FLARE: one workflow for cyclic and FedAvg.

Exported into the job's ``app_server/custom`` by :mod:`federated_prostate` (the FLARE Job API
copies the module of a custom controller). What crosses the network, per site and task:

- ``intensity_stats`` (once, before round 0): the site's pixel count, sum and sum of squares of
  its training slices and its number of training slices; the first site also returns the
  freshly initialised weights (every site builds the same network from the bundle's
  ``train.json``), unless the server starts from ``initial_ckpt``. The server pools the sums into
  the training-set mean and std and writes them into the global model's standardisation buffers.
- ``train`` (every round): the global weights go out; the site loads them, trains
  ``local_epochs`` on its own slices and sends back its full weights and its slice count.
- ``validate`` (after every round): the new global weights go out; the site returns its
  validation Dice of them.

No pixel, label or file name leaves a site. The global model of every round is written as a
plain ``state_dict`` (``rounds/round_NNN.pt``, and the last one as ``model.pt``), with
``metrics.json`` (per-round, per-site validation Dice), into ``<run dir>/prostate_fl``.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.base_fedavg import BaseFedAvg

from shared_transforms.datasets import stats_from_sums
from shared_transforms.files import write_json
from shared_transforms.handlers import atomic_torch_save

WORKFLOWS = ("cyclic", "fedavg")
ORDERS = ("fixed", "random")
#: the network buffers that hold the training-set standardisation (scripts.net.ProstateSegNet)
STAT_KEYS = ("intensity_mean", "intensity_std")
OUT_FOLDER = "prostate_fl"


class ProstateFLController(BaseFedAvg):
    """Federated intensity statistics, then ``num_rounds`` of cyclic or FedAvg training with validation.

    Args:
        workflow: ``"cyclic"`` (the model visits the sites one after another each round, the
            federated form of the paper's site-to-site chain) or ``"fedavg"`` (all sites train
            the same global model; their weights are averaged with each site's number of training
            slices as its weight).
        num_rounds: global rounds.
        sites: client names, in the fixed cyclic order (default: the connected clients, sorted).
        order: cyclic visiting order, ``"fixed"`` or ``"random"`` (reshuffled every round from ``seed``).
        seed: seed of the random order.
        initial_ckpt: a ``state_dict`` file (e.g. a previous stage's ``models/model.pt``) to start
            from instead of the first site's fresh initialisation; its standardisation buffers are
            replaced by the federated statistics.
        task_timeout: seconds to wait for a site's answer to one task (0: no limit).
    """

    def __init__(
        self,
        *args,
        workflow: str,
        num_rounds: int = 2,
        sites: list[str] | None = None,
        order: str = "fixed",
        seed: int = 0,
        initial_ckpt: str | None = None,
        task_timeout: int = 0,
        **kwargs,
    ):
        super().__init__(*args, num_clients=len(sites) if sites else 3, num_rounds=num_rounds, **kwargs)
        if workflow not in WORKFLOWS:
            raise ValueError(f"workflow must be one of {WORKFLOWS}, got {workflow!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.workflow = workflow
        self.sites = list(sites) if sites else None
        self.order = order
        self.seed = int(seed)
        self.initial_ckpt = initial_ckpt
        self.task_timeout = int(task_timeout)

    # ------------------------------------------------------------------ helpers
    def _out_dir(self) -> Path:
        run_dir = self.engine.get_workspace().get_run_dir(self.fl_ctx.get_job_id())
        return Path(run_dir) / OUT_FOLDER

    def _ask(self, task: str, params: dict, targets: list[str], meta: dict | None = None) -> dict[str, FLModel]:
        """Send one task to ``targets``; return their answers by site name (every site must answer)."""
        data = FLModel(params=params, params_type=ParamsType.FULL, meta=dict(meta or {}),
                       current_round=self.current_round, total_rounds=self.num_rounds)
        results = self.send_model_and_wait(task_name=task, data=data, targets=targets, timeout=self.task_timeout)
        answers = {}
        for r in results:
            site = (r.meta or {}).get("site") or (r.meta or {}).get("client_name")
            answers[site] = r
        missing = sorted(set(targets) - set(answers))
        if missing:
            raise RuntimeError(f"task '{task}': no answer from {missing} (got {sorted(answers)})")
        return answers

    def _set_stats(self, params: dict) -> dict:
        for key, value in zip(STAT_KEYS, (self.stats["mean"], self.stats["std"])):
            if key not in params:
                raise KeyError(f"the global model has no '{key}' buffer: is this the prostate_mri_transfer network?")
            params[key] = np.asarray(value, dtype=np.asarray(params[key]).dtype).reshape(np.shape(params[key]))
        return params

    def _save(self, params: dict, name: str) -> None:
        state = {k: torch.as_tensor(np.asarray(v)) for k, v in params.items()}
        atomic_torch_save(state, self._out_dir() / name)

    def _write_metrics(self) -> None:
        write_json(self._out_dir() / "metrics.json", self.metrics)

    # ------------------------------------------------------------------ workflow
    def intensity_round(self, sites: list[str]) -> dict:
        """Pool the sites' intensity sums; return the initial global weights with the pooled statistics."""
        first = sites[0]
        answers = {}
        for site in sites:  # one at a time: only the first one is asked for its weights
            meta = {"send_weights": site == first and not self.initial_ckpt}
            answers.update(self._ask("intensity_stats", {}, [site], meta=meta))
        sums = {s: answers[s].meta["intensity_sums"] for s in sites}
        self.slices = {s: int(answers[s].meta["num_train_slices"]) for s in sites}
        self.stats = stats_from_sums(list(sums.values()))
        self.info(f"federated intensity statistics from {self.slices} training slices: {self.stats}")
        if self.initial_ckpt:
            state = torch.load(self.initial_ckpt, map_location="cpu", weights_only=True)
            state = state.get("model", state) if isinstance(state, dict) else state
            params = {k: v.numpy() for k, v in state.items()}
        else:
            params = dict(answers[first].params)
        self.metrics.update({"intensity_sums": sums, "intensity_stats": self.stats, "train_slices": self.slices})
        return self._set_stats(params)

    def cyclic_round(self, params: dict, sites: list[str]) -> dict:
        order = list(sites)
        if self.order == "random":
            random.Random(self.seed * 100003 + self.current_round).shuffle(order)
        self.info(f"round {self.current_round}: cyclic order {order}")
        for site in order:
            params = dict(self._ask("train", params, [site])[site].params)
        self.metrics["orders"].append(order)
        return params

    def fedavg_round(self, params: dict, sites: list[str]) -> dict:
        answers = self._ask("train", params, sites)
        results = []
        for site in sites:
            r = answers[site]
            r.meta[FLMetaKey.NUM_STEPS_CURRENT_ROUND] = self.slices[site]  # FedAvg weight: the site's slices
            r.meta["client_name"] = site
            results.append(r)
        aggregated = self.aggregate(results).params
        if not aggregated:
            raise RuntimeError(f"round {self.current_round}: FedAvg aggregation of {sites} failed (see the server log)")
        out = {}
        for k, v in aggregated.items():
            dtype = np.asarray(params[k]).dtype
            v = np.asarray(v)  # integer buffers (BatchNorm's num_batches_tracked) come back as float means
            out[k] = (np.rint(v) if np.issubdtype(dtype, np.integer) else v).astype(dtype)
        return out

    def run(self) -> None:
        connected = self.sample_clients()
        sites = self.sites or sorted(connected)
        missing = sorted(set(sites) - set(connected))
        if missing:  # a task for a client that does not exist would wait for ever
            raise RuntimeError(f"sites {missing} are not connected clients ({sorted(connected)}): name the FLARE "
                               "clients after the job's `sites`, or edit `sites` in config_fed_server.json")
        self.metrics = {"workflow": self.workflow, "sites": sites, "num_rounds": self.num_rounds,
                        "order": self.order, "rounds": [], "orders": []}
        self.current_round = 0
        params = self.intensity_round(sites)
        self._save(params, "rounds/round_init.pt")
        for self.current_round in range(self.num_rounds):
            self.info(f"round {self.current_round} of {self.num_rounds} ({self.workflow})")
            if self.workflow == "cyclic":
                params = self.cyclic_round(params, sites)
            else:
                params = self.fedavg_round(params, sites)
            params = self._set_stats(params)  # the pooled statistics stay exact through averaging
            answers = self._ask("validate", params, sites)
            dice = {s: float(answers[s].metrics["val_mean_dice"]) for s in sites}
            self.metrics["rounds"].append({"round": self.current_round, "val_mean_dice": dice})
            self.info(f"round {self.current_round}: global model's validation Dice per site {dice}")
            self._save(params, f"rounds/round_{self.current_round:03d}.pt")
            self._save(params, "model.pt")
            self._write_metrics()
        self.info(f"finished {self.num_rounds} {self.workflow} rounds; global model in {self._out_dir() / 'model.pt'}")
