"""Worker for test_segment_train.py: `torchrun --nproc_per_node 2 segment_ddp_worker.py PHANTOM_DIR OUT_DIR`.

Each process records its rank, then all train one tiny segmenter together on CPU (gloo), cpu=True.
"""

import json
import sys
from pathlib import Path

from accelerate import PartialState

from segment.data.protocol import make_folds
from segment.data.slices import prepare
from segment.train import SegmenterConfig, train
from segment.data.volumes import load_spec


def main() -> None:
    phantom, out = Path(sys.argv[1]), Path(sys.argv[2])
    state = PartialState(cpu=True)
    (out / f"rank{state.process_index}.json").write_text(json.dumps({"rank": state.process_index,
                                                                     "backend": str(state.backend)}))
    spec = load_spec(phantom / "dataset.toml")
    data = prepare(spec, phantom, resolution=32, cache_dir=out / "cache")
    fold = make_folds(sorted(data.ids, key=int), spec.n_folds)[0]
    cfg = SegmenterConfig(width=4, depth=2, dilated_blocks=1, embed_dim=8, resolution=32, steps=4, batch=1,
                          warmup=1, checkpoint_every=2, cpu=True)
    train(cfg, data, fold, test_class_ids=(1,), setting=1, out_dir=out / "run")


if __name__ == "__main__":
    main()
