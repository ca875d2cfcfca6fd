"""Shared small models and inputs for the test suite (CPU, random weights, fast)."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent


def _tree_files() -> set[str] | None:
    """Files in the source tree, ignored ones included (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=all", "--ignored"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {line[3:] for line in out.splitlines()
            if line[:2] in ("??", "!!") and "__pycache__" not in line and not line[3:].startswith(".venv/")}


def pytest_configure(config: pytest.Config) -> None:
    """Hypothesis keeps a cache (``.hypothesis/``) in the working directory from collection on:
    give it a temporary folder instead of the source tree."""
    from hypothesis.configuration import set_hypothesis_home_dir

    config.cam_hypothesis_home = tempfile.mkdtemp(prefix="cam_monitor_hypothesis_")
    set_hypothesis_home_dir(config.cam_hypothesis_home)


def pytest_unconfigure(config: pytest.Config) -> None:
    home = getattr(config, "cam_hypothesis_home", None)
    if home:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def source_tree_stays_clean():
    """No test may write new files into the source tree (run output belongs under tmp_path)."""
    before = _tree_files()
    yield
    after = _tree_files()
    if before is not None and after is not None:
        new = sorted(after - before)
        assert not new, f"tests wrote into the source tree: {new[:10]}"


@pytest.fixture(autouse=True)
def run_in_tmp_path(tmp_path, monkeypatch):
    """Relative paths (a default log dir, ``lightning_logs/``) land in the test's tmp_path."""
    monkeypatch.chdir(tmp_path)


class SmallCNN(nn.Module):
    """Conv/BN/ReLU features, a Dropout, global average pooling and a linear head."""

    def __init__(self, num_classes: int = 5, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.pool(self.features(x)).flatten(1)))


class GapLinear(nn.Module):
    """A CAM-able model by construction: features -> GAP -> Linear (the CAM oracle holds exactly)."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 7, 3, padding=1))
        self.fc = nn.Linear(7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def make_trained_bn(model: nn.Module) -> nn.Module:
    """Give BatchNorm layers non-trivial running stats so eval/train mode differ."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16))
    return model


@pytest.fixture
def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return make_trained_bn(SmallCNN()).eval()


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 16, 16, generator=g)
