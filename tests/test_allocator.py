import subprocess
import sys

import pytest

from distill.allocator import keep_freed_memory


def _run(code: str, **env) -> str:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, **env}).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_keep_freed_memory_is_applied_once_and_can_be_refused():
    code = "from distill.allocator import keep_freed_memory as k; print(k(), k())"
    assert _run(code) == "True True"  # glibc accepts both settings; the second call is a no-op
    assert _run(code, DISTILL_KEEP_FREED_MEMORY="0") == "False False"


def test_trainer_tunes_the_allocator_on_cpu():
    code = (
        "import torch, distill.allocator as a\n"
        "from distill import Distiller, Term, TrainConfig, Trainer\n"
        "from distill.data import BatchLoader\nfrom distill.data.types import ArrayDataset\n"
        "x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))\n"
        "loader = BatchLoader(ArrayDataset(x, y), 16, shuffle=True)\n"
        "d = Distiller(torch.nn.Linear(4, 3), None, [Term('ce', 'ce')])\n"
        "d.dry_run(next(iter(loader)))\n"
        "before = a._done\n"
        "Trainer(d, loader, TrainConfig(epochs=1, progress=False, tensorboard=False)).fit()\n"
        "print(before, a._done)\n"
    )
    expected = "None True" if sys.platform.startswith("linux") else "None False"
    assert _run(code) == expected
    assert keep_freed_memory() in (True, False)
