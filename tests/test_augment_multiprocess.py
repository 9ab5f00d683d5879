"""Both generators train in two CPU processes (torchrun + Accelerator(cpu=True), gloo) and save one checkpoint."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from augment.training import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from augment import ddpm, gan
    from augment_helpers import ellipse_masks, images_for, provenance, tiny_ddpm, tiny_gan
    out = Path(sys.argv[1])
    masks = ellipse_masks(6)
    pairs = (images_for(masks), masks)
    ddpm.train(tiny_ddpm(pretrain_steps=2, finetune_steps=0), pretrain_pairs=pairs, provenance=provenance(6, 0),
               out_dir=out / "ddpm")
    gan.train(tiny_gan(pretrain_steps=2, finetune_steps=0), pretrain_pairs=pairs, provenance=provenance(6, 0),
              out_dir=out / "gan")
""")


def test_two_process_training_writes_one_checkpoint_per_generator(tmp_path):
    script = tmp_path / "train_two.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kind in ("ddpm", "gan"):
        ckpt = load_checkpoint(tmp_path / "out" / kind, kind=kind)
        assert ckpt["runtime"]["num_processes"] == 2
        assert ckpt["runtime"]["device"].startswith("cpu")
        assert all(torch.isfinite(v).all() for v in ckpt["state"][("unet" if kind == "ddpm" else "generator")].values()
                   if v.is_floating_point())
        assert not list((tmp_path / "out" / kind).glob(".*.tmp"))  # no partial files left behind
