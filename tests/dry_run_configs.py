"""Dry-run several configs in one launch (a helper of tests/test_global_batch.py, launched as the processes of a real
multi-process CPU run; not a test itself): one start-up of torch per process for all of them.

    accelerate launch --config_file launch/accelerate/cpu.yaml --num_processes N tests/dry_run_configs.py \
        CONFIG... -- TRAIN_PY_ARGS...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

if __name__ == "__main__":
    split = sys.argv.index("--")
    for config in sys.argv[1:split]:
        train.cli(["-c", config, *sys.argv[split + 1:], "--dry-run"])
