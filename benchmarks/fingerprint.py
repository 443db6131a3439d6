"""A digest of what experiments train, to show a refactor moves no result.

    python benchmarks/fingerprint.py REPO [--default] [key=value ...]

Runs debug experiments (or, with --default, the default experiment) of tidal-entropy, lloss,
entropy and badge through `pipeline.run_cycle` with the `tidal` package found under REPO (for
example a `git worktree` of the commit before a change), and prints one digest per strategy over
every cycle's weights (backbone and auxiliary module), scores.csv and train_history.json. The same
digests from two checkouts on one machine and thread count mean bit-identical results:

    git worktree add --detach /tmp/before HEAD~1
    OMP_NUM_THREADS=1 python benchmarks/fingerprint.py /tmp/before --default
    OMP_NUM_THREADS=1 python benchmarks/fingerprint.py . --default
"""
import hashlib
import json
import sys
import tempfile
from pathlib import Path

repo = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(repo))

import torch  # noqa: E402

from tidal import pipeline  # noqa: E402
from tidal.config import load_params  # noqa: E402
from tidal.data.sources import materialize  # noqa: E402
from tidal.experiment import prepare_data, start_experiment  # noqa: E402
from tidal.workspace import workspace  # noqa: E402

extra = [a for a in sys.argv[2:] if a != "--default"]
base = [] if "--default" in sys.argv else ["preset=debug"]
digests = {}
with tempfile.TemporaryDirectory() as tmp:
    materialize(Path(tmp) / "data", "digits")
    for strategy in ["tidal-entropy", "lloss", "entropy", "badge"]:
        params = load_params(None, [*base, f"runs_dir={tmp}/runs", f"data_root={tmp}/data", "device=cpu",
                                    "tracking=false", f"strategy={strategy}", f"experiment={strategy}", *extra])
        prepared = prepare_data(params)
        start_experiment(params, prepared["data_version"], prepared["pool_version"])
        digest = hashlib.sha256()
        for cycle in range(params["cycles"]):
            pipeline.run_cycle(params, cycle)
            out = workspace(params).cycle_dir(cycle)
            saved = torch.load(out / "model.pt", weights_only=True)
            for part in sorted(k for k in saved if k != "spec"):
                for key, value in sorted((saved[part] or {}).items()):
                    digest.update(part.encode() + key.encode() + value.cpu().numpy().tobytes())
            digest.update((out / "scores.csv").read_bytes())
            digest.update((out / "train_history.json").read_bytes())
        digests[strategy] = digest.hexdigest()[:16]
print(json.dumps({"tidal": str(Path(pipeline.__file__).parent), **digests}))
