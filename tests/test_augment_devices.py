"""Where the learned sources compute when a config says cpu = false: the registration network follows the
config's flag like the generators (accelerate refuses `cpu=True` in a process whose first accelerator took a
GPU, which a hard-coded flag did on every GPU unit), and the generators sample on the GPU they trained for."""
from __future__ import annotations

import pytest
import torch

import augment.learned as learned
import augment.registration as registration
from augment.config import LearnedConfig
from augment.training import load_checkpoint, make_accelerator, sample_device
from augment_helpers import phantom_volumes

RES = 32


@pytest.mark.parametrize("cpu", [True, False])
def test_registration_asks_accelerate_with_the_configs_cpu_flag(tmp_path, monkeypatch, cpu):
    flags = []

    def recording(*, cpu, mixed_precision):
        flags.append(cpu)
        return make_accelerator(cpu=cpu, mixed_precision=mixed_precision)

    monkeypatch.setattr(registration, "make_accelerator", recording)
    torch.set_num_threads(1)
    config = LearnedConfig(resolution=RES, channels=(4, 8, 8, 8), final_channels=(4,), steps=2, batch_size=2,
                           pool_size=4, cpu=cpu)
    path = learned.train(config, volumes=phantom_volumes(), fold=0, query_volumes=("9",), out_dir=tmp_path / "reg")
    assert flags == [cpu]  # one accelerator, with the config's flag (never a hard-coded cpu=True)
    ckpt = load_checkpoint(path, kind=registration.KIND)
    assert all(t.device.type == "cpu" for t in ckpt["state"]["net"].values())  # weights saved from the CPU


def test_sample_device_follows_the_checkpoint_and_the_machine(monkeypatch):
    gpu_trained, cpu_trained, old = {"config": {"cpu": False}}, {"config": {"cpu": True}}, {"config": {}}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert sample_device(gpu_trained) == torch.device("cuda")
    assert sample_device(cpu_trained) == torch.device("cpu")
    assert sample_device(old) == torch.device("cpu")  # a checkpoint without the flag was trained on the CPU
    assert sample_device(gpu_trained, "cpu") == torch.device("cpu")  # an explicit device wins
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sample_device(gpu_trained) == torch.device("cpu")  # no GPU here: the CPU, as accelerate falls back
