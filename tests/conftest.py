"""Shared fixtures: small real image folders (MNIST-5k PNGs, a CIFAR-10 JPEG sample), a pruned
cifar_small, and a helper that runs the installed `edgetune` console script in a subprocess."""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MNIST_PER_CLASS = 40
CIFAR_PER_CLASS = 30
# Intra-op threads for torch in the test process and in every process it starts (CLI, daemon and
# its cycle worker, demo), set through the inherited environment. One by default: the test models and
# batches are tiny, pytest runs two workers on two cores, and OpenMP threads competing with other
# processes run many times slower. EDGETUNE_TEST_THREADS=2 runs the suite with two (it must pass both ways).
TEST_THREADS = int(os.environ.get("EDGETUNE_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(TEST_THREADS)
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def pytest_report_header(config) -> str:
    """Which threads and CPU kernels the floats came from (ATEN_CPU_CAPABILITY=default|avx2 picks others)."""
    return f"torch {torch.__version__}: {torch.get_num_threads()} thread(s), CPU kernels {torch.backends.cpu.get_cpu_capability()}"


# ---------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------

def write_mnist_folder(root: Path, classes: list[int], per_class: int) -> Path:
    """Write `per_class` MNIST-5k digits of each class in `classes` as grayscale PNGs."""
    from prune_core.datasets import mnist5k

    data = mnist5k(32)
    counts = {c: 0 for c in classes}
    for i, label in enumerate(data.labels.tolist()):
        if label not in counts or counts[label] >= per_class:
            continue
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.images[i, 0].numpy()).save(folder / f"{i:04d}.png")
        counts[label] += 1
        if all(n >= per_class for n in counts.values()):
            break
    return root


@pytest.fixture(scope="session")
def mnist_folder(tmp_path_factory) -> Path:
    """ImageFolder of 40 MNIST digits per class, folders '0'..'9' (400 grayscale 32x32 PNGs)."""
    return write_mnist_folder(tmp_path_factory.mktemp("mnist") / "images", list(range(10)), MNIST_PER_CLASS)


def _cifar_archive() -> Path | None:
    for candidate in (REPO.parent / "shared" / "data", REPO / "shared" / "data"):
        path = candidate / "cifar10-train.tar.gz"
        if path.is_file():
            return path
    return None


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory) -> Path:
    """ImageFolder with 30 CIFAR-10 training JPEGs per class (skipped where the archive is absent)."""
    archive = _cifar_archive()
    if archive is None:
        pytest.skip("../shared/data/cifar10-train.tar.gz not available")
    root = tmp_path_factory.mktemp("cifar") / "images"
    counts: dict[str, int] = {}
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or not parts[-1].lower().endswith(".jpg"):
                continue
            cls = parts[1]
            if counts.get(cls, 0) >= CIFAR_PER_CLASS:
                continue
            fh = tar.extractfile(member)
            if fh is None:
                continue
            (root / cls).mkdir(parents=True, exist_ok=True)
            (root / cls / parts[2]).write_bytes(fh.read())
            counts[cls] = counts.get(cls, 0) + 1
            if len(counts) == len(CIFAR_CLASSES) and all(n >= CIFAR_PER_CLASS for n in counts.values()):
                break
    return root


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------

def _randomise_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every batch norm non-trivial running statistics and affine parameters, so outputs
    (and save/load round trips) depend on all buffers, not just the default 0/1 values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def randomise_bn() -> Callable[..., torch.nn.Module]:
    """`randomise_bn(model, seed)`: random BN statistics and affine parameters, model in eval mode."""
    return _randomise_bn


@pytest.fixture(scope="session")
def _pruned_cifar_small():
    from prune_core.architectures import build_model
    from prune_core.criteria import get_criterion
    from prune_core.surgery import PruneSpec, prune_to_level

    torch.manual_seed(0)
    model = _randomise_bn(build_model("cifar_small", 10))
    scores = get_criterion("l1").score(model)
    outcome = prune_to_level(model, scores, PruneSpec(0.5), 32)
    return model, outcome


@pytest.fixture
def pruned_cifar_small(_pruned_cifar_small):
    """(unpruned cifar_small, PruneOutcome at level 0.5 by L1), fresh copies for each test."""
    model, outcome = _pruned_cifar_small
    return copy.deepcopy(model), copy.deepcopy(outcome)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def edgetune_command() -> list[str]:
    """The installed `edgetune` console script next to this interpreter (cli.py has no __main__)."""
    exe = shutil.which("edgetune", path=os.path.dirname(sys.executable))
    if exe is not None:
        return [exe]
    return [sys.executable, "-c", "import sys; from prune_core.cli import main; main(sys.argv[1:])"]


def run_edgetune(*args: str | os.PathLike, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `edgetune ARGS...` to completion; stdout/stderr captured as text."""
    env = dict(os.environ)
    env.setdefault("EDGETUNE_DEVICE", "cpu")
    return subprocess.run(
        [*edgetune_command(), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO)
    )


@pytest.fixture(scope="session")
def edgetune() -> Callable[..., subprocess.CompletedProcess]:
    """`edgetune("info", dir)` runs the CLI in a subprocess and returns the CompletedProcess."""
    return run_edgetune
