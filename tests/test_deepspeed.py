"""Optional DeepSpeed backend: DP=2 with DeepSpeed ZeRO-1/2 trains like the native single-rank run."""
import importlib.util
import json
import os

import pytest
import torch

from distributed import run_distributed
from test_training import _config, _train, reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed not installed (optional: make install-deepspeed)")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_deepspeed(ds_path: str):
    # DeepSpeed JIT-builds a small shared-memory op on CPU; keep it in the (git-ignored) repo cache.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))
    config = _config()
    config.parallel.deepspeed, config.parallel.deepspeed_config = True, ds_path
    return _train(config)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_dp2_matches_single_rank(tmp_path, stage):
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps({"zero_optimization": {"stage": stage}, "train_batch_size": 999}))
    results = run_distributed(_train_deepspeed, 2, str(ds_path))
    ref_losses, ref_weights = reference()
    for losses, weights in results:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    for name, w in ref_weights.items():
        torch.testing.assert_close(results[0][1][name], w, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_deepspeed_rejects_tensor_parallel():
    from megagpt.arguments import ConfigError, validate
    config = _config(tp=2)
    config.parallel.deepspeed = True
    with pytest.raises(ConfigError, match="--deepspeed runs data parallelism only"):
        validate(config, world_size=2)
