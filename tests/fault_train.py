"""Test helper (not a test): `python3 tests/fault_train.py TRAIN_ARGS...` runs train.py and SIGKILLs this
process right after optimizer step FAULT_KILL_STEP (environment) on rank FAULT_KILL_RANK (default 0),
before anything else of that step boundary (no checkpoint of it), like an out-of-memory kill or a lost
machine. Only in the first attempt: under `torchrun --max-restarts N` (TORCHELASTIC_RESTART_COUNT > 0)
the restarted workers run undisturbed. Without FAULT_KILL_STEP it is train.py."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402


def kill_after_step(k):
    """Make train.Trainer.step SIGKILL the process once state['step'] reaches k."""
    step = train.Trainer.step

    def step_then_maybe_die(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        if self.state['step'] == k:
            print(f'fault_train: SIGKILL after step {k} (rank {self.rank})', flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    train.Trainer.step = step_then_maybe_die


if __name__ == '__main__':
    first_attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0'
    my_rank = os.environ.get('RANK', '0') == os.environ.get('FAULT_KILL_RANK', '0')
    if os.environ.get('FAULT_KILL_STEP') and first_attempt and my_rank:
        kill_after_step(int(os.environ['FAULT_KILL_STEP']))
    train.main(sys.argv[1:])
