"""--async-save (#10): files written by a background thread while training goes on; the checkpoint is marked
complete only once every rank has written it; a failed write is reported and never marked; resume is exact."""
from __future__ import annotations

import os

from distributed import run_distributed
from megagpt.checkpoint.format import read_tracker
from test_run_control import _train


def _worker(ckpt: str, fail_iteration: int) -> dict:
    out = {"straight": _train()["losses"]}
    out["async"] = _train(save=ckpt, save_interval=2, train_iters=4, async_save=True)["losses"]
    out["tracker"] = read_tracker(ckpt)
    out["resumed"] = _train(load=ckpt)
    import megagpt.checkpoint.sharded as sharded

    real = sharded.atomic_torch_save

    def failing(obj, path):
        if f"iter_{fail_iteration:07d}" in path:
            raise OSError("disk full (injected)")
        return real(obj, path)

    sharded.atomic_torch_save = failing
    try:
        bad = ckpt + "-failing"
        out["failing"] = _train(save=bad, save_interval=2, train_iters=4, async_save=True)["losses"]
        out["failing_tracker"] = read_tracker(bad)
    finally:
        sharded.atomic_torch_save = real
    return out


def test_async_save_marks_complete_checkpoints_only_and_resumes_exactly(tmp_path):
    results = run_distributed(_worker, 2, str(tmp_path / "ckpt"), 4)
    for r in results:
        assert r["async"] == r["straight"][:4] and r["tracker"] == 4
        assert r["resumed"]["start"] == 4 and r["resumed"]["losses"] == r["straight"][4:]
        assert r["failing"] == r["straight"][:4]          # training went on past the failed write
        assert r["failing_tracker"] == 2                  # iteration 4 never marked complete
    assert os.path.isdir(tmp_path / "ckpt" / "iter_0000002")
