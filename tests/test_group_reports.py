"""What a group reports about itself is true: its SyncReports and its /metrics.

Plain DiLoCo and LocalSGD sync on the training thread: the inner loop is
blocked for the whole sync (quorum, exchange, vote), so all of it is waiting
and nothing is hidden.  (Streaming DiLoCo's hidden share is measured in
bench/streaming.py.)
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from ftdiloco.config import Config
from ftdiloco.coordination.manager import Manager
from ftdiloco.training.local_sgd import LocalSGD
from tests.test_checkpoint import Trainer, manager


def test_plain_diloco_reports_its_whole_sync_as_waiting(
    lighthouse_url: str, tmp_path: Path
) -> None:
    with manager(lighthouse_url, None) as m:
        trainer = Trainer(m)
        trainer.outer_steps(2)
        report = trainer.diloco.last_sync
    assert report is not None and report.committed
    assert report.seconds > 0
    assert report.waited == report.seconds, report
    assert report.hidden_fraction == 0.0, report


def test_localsgd_reports_its_whole_sync_as_waiting(lighthouse_url: str) -> None:
    with manager(lighthouse_url, None) as m:
        torch.manual_seed(0)
        model = nn.Linear(4, 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with LocalSGD(m, model, opt, sync_every=2) as local:
            for _ in range(2):
                model(torch.ones(1, 4)).sum().backward()
                opt.step()
                opt.zero_grad()
            report = local.last_sync
    assert report is not None and report.committed
    assert report.waited == report.seconds, report
    assert report.hidden_fraction == 0.0, report


def test_a_training_process_exports_its_metrics_on_the_manager_port(
    lighthouse_url: str,
) -> None:
    with manager(lighthouse_url, None) as m:
        trainer = Trainer(m)
        trainer.outer_steps(3)
        m.report_loss(1.5)
        with urllib.request.urlopen(f"{m.address}/metrics", timeout=5) as response:
            text = response.read().decode()
        step = m.step
    assert "_created" not in text
    samples = {
        s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
    }
    # The first (empty, aligning) outer step on entering, then three.
    assert samples["ftdiloco_steps_committed_total"] == step == 4
    assert samples["ftdiloco_steps_rolled_back_total"] == 0
    assert samples["ftdiloco_step"] == step
    assert samples["ftdiloco_loss"] == 1.5
    assert samples["ftdiloco_quorum_participants"] == 1
    assert samples["ftdiloco_sync_seconds_count"] == step
    assert samples["ftdiloco_hidden_fraction"] == 0.0  # plain DiLoCo hides nothing
    assert samples["ftdiloco_heals_total"] == 0


def test_a_manager_refuses_standalone_mode_in_one_line() -> None:
    # FTDILOCO_LIGHTHOUSE=none is for ftdiloco.coordination.standalone (no lighthouse).
    with pytest.raises(ValueError, match="StandaloneManager"):
        Manager(Config.from_env({}, lighthouse="none"))


def test_the_held_out_loss_reaches_metrics(lighthouse_url: str) -> None:
    with manager(lighthouse_url, None) as m:
        m.report_loss(2.0, eval_loss=1.75)
        with urllib.request.urlopen(f"{m.address}/metrics", timeout=5) as response:
            text = response.read().decode()
    samples = {
        s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
    }
    assert (samples["ftdiloco_loss"], samples["ftdiloco_eval_loss"]) == (2.0, 1.75)
