"""``qlip eval`` with TinyInception for Inception, as a launcher's worker runs it:
``python -m torch.distributed.run --nproc-per-node 2 tests/evaluation/sharded_eval_driver.py
eval ...`` (the sharded-evaluation test)."""

import sys

import qlip.evaluation.measures as measures
from qlip.cli import main
from qlip.metrics import InceptionExtractor
from qlip.testing import TinyInception


def tiny_inception(weights, device):
    return InceptionExtractor(network=TinyInception(), device=device)


if __name__ == "__main__":
    measures.inception_extractor = tiny_inception
    sys.exit(main(sys.argv[1:]))
