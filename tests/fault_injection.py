"""``python tests/fault_injection.py ARGS`` runs ``distill ARGS`` with the trainer's fault point.

tests/test_crash.py kills real runs at chosen places with ``DISTILL_FAULT`` (see
``distill.checkpoints``). The points inside checkpoint and cache writes are part of distill; the
training loop carries none. This script adds one to every fit of its process, as a callback
(:func:`distill.callbacks.add_global_callback`): :class:`EpochStepFault` kills the process with
SIGKILL after the step that ``DISTILL_FAULT=epoch-step:[NAME:]E:S`` names. Only these tests install
it; ``distill`` itself never does.
"""

import sys

from distill.callbacks import Callback, FitState, add_global_callback
from distill.checkpoints import fault_armed, fault_point


class EpochStepFault(Callback):
    """SIGKILL after step S of epoch E (1-based) of the trainer NAME, when DISTILL_FAULT says so."""

    def on_step_end(self, run: FitState) -> None:
        fault_point("epoch-step", run.name, run.epoch + 1, run.step + 1)


def main(argv: list[str]) -> int:
    if fault_armed("epoch-step"):
        add_global_callback(EpochStepFault)
    from distill.cli import main as distill

    return distill(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
