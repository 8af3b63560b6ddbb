"""Parameter defaults of the components and the pipeline: the steps' own config defaults.

A Kubeflow run, ``streetvision run`` and the step CLIs then start from the same values; only the
"no constraint" / "no gate" sentinels (a KFP parameter cannot be None) are the components' own.
"""

import json

from streetvision.steps import adapt_explora, make_splits, pack_shards, train_baseline, train_gate

SPLITS = make_splits.Config().splits
SPLIT_RATIOS = json.dumps(SPLITS.ratios, separators=(",", ":"))  # a string parameter, parsed by the step
PACK = pack_shards.Config()
TRAIN = train_baseline.Config()
GATE = train_gate.Config()
EXPLORA = adapt_explora.Config()
