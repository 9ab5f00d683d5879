"""Generators grounded in learned pairs (issue 12 item 3): SDEdit with the DDPM, and the fine-tuning pairs and
provenance of a generator fine-tuned on another source's set plus the supports."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from augment import ddpm, gan, sdedit
from augment.finetune_pairs import SUPPORT, finetune_pairs, set_slices
from augment.manifest import LeakageError, Provenance, SliceRef, refs
from augment.pairs import PairError
from augment.registry import FINETUNE_ON, GENERATORS, SUPPORTS, VOLUME_SOURCES
from augment.synthesis import SyntheticSet
from augment.training import load_checkpoint
from augment_helpers import RES, ellipse_masks, images_for, provenance, tiny_ddpm, tiny_gan

QUERIES = ("3", "4")


@pytest.fixture(scope="module")
def data():
    masks = torch.from_numpy(ellipse_masks(6, seed=1))
    return torch.from_numpy(images_for(masks.numpy(), seed=1)), masks


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    images, masks = data
    return ddpm.train(tiny_ddpm(), pretrain_pairs=(images, masks), provenance=provenance(6, 0),
                      out_dir=tmp_path_factory.mktemp("ddpm"))


def learned_set(data, *, target: str = "5", donor: str = "6", n: int = 4) -> SyntheticSet:
    """A set shaped like the learned source's: supports of volume "2" warped onto `target`, donor `donor`."""
    images, masks = data
    pairs = [{"support": k % 3, "volume": target, "slice": k, "similarity": 0.5, "folded_share": 0.0,
              "appearance_donor": [donor, k]} for k in range(n)]
    training = Provenance(fold=0, class_name="liver", pretrain=refs("7", [0, 1]), query_volumes=QUERIES)
    manifest = {"generator": "learned", "checkpoint_sha256": "abc", "seed": 0, "n": n, "fold": 0,
                "class_name": "liver", "support": [{"volume": "2", "slice": s} for s in range(3)],
                "training": training.to_dict(), "query_volumes": list(QUERIES), "pairs": pairs,
                "source": [{"volume": "2", "slice": p["support"]} for p in pairs], "dropped_fragments": [0, 0, 0]}
    return SyntheticSet(images[:n].clone(), masks[:n].clone(), json.loads(json.dumps(manifest)))


def support(data):
    images, masks = data
    return images[:3], masks[:3], refs("2", range(3))


# --- SDEdit -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["dpmsolver++", "ddim"])
def test_strength_0_returns_the_images_unchanged_and_1_equals_sampling_from_noise(checkpoint, data, sampler):
    images, masks = data
    same, kept = ddpm.sdedit(checkpoint, images, masks, strength=0.0, seed=3, sampler=sampler, steps=3)
    assert torch.equal(same, images) and torch.equal(kept, masks)
    full, kept = ddpm.sdedit(checkpoint, images, masks, strength=1.0, seed=3, sampler=sampler, steps=3)
    sampled, _ = ddpm.sample(checkpoint, masks, seed=3, sampler=sampler, steps=3)
    assert torch.equal(full, sampled) and torch.equal(kept, masks)


def test_partial_strength_runs_the_end_of_the_trajectory_seeded_and_keeps_the_masks(checkpoint, data):
    images, masks = data
    assert [ddpm.sdedit_steps(10, s) for s in (0.0, 0.09, 0.1, 0.55, 1.0)] == [0, 0, 1, 5, 10]
    low, kept = ddpm.sdedit(checkpoint, images, masks, strength=0.2, seed=1, steps=10)
    again, _ = ddpm.sdedit(checkpoint, images, masks, strength=0.2, seed=1, steps=10)
    other, _ = ddpm.sdedit(checkpoint, images, masks, strength=0.2, seed=2, steps=10)
    full, _ = ddpm.sdedit(checkpoint, images, masks, strength=1.0, seed=1, steps=10)
    assert torch.equal(low, again) and not torch.equal(low, other) and torch.equal(kept, masks)
    assert torch.isfinite(low).all() and not torch.equal(low, images)
    # two of ten steps from a lightly noised image stay near it; the whole trajectory forgets it
    assert (low - images).abs().mean() < 0.5 * (full - images).abs().mean()


def test_bad_strength_and_joint_ddpm_are_refused(checkpoint, data):
    images, masks = data
    with pytest.raises(ValueError, match=r"strength=1.5; it is the fraction of the diffusion trajectory, in \[0, 1\]"):
        ddpm.sdedit(checkpoint, images, masks, strength=1.5, seed=0)
    joint = load_checkpoint(checkpoint, kind="ddpm")
    joint["config"] = {**joint["config"], "joint": True}
    with pytest.raises(ValueError, match=r"sdedit keeps the masks, but checkpoint .* is a joint DDPM"):
        ddpm.sdedit(joint, images, masks, strength=0.5, seed=0)


def test_sdedit_set_records_both_inputs_and_refuses_a_query_volume(checkpoint, data, tmp_path):
    pairs = learned_set(data)
    syn = sdedit.make_set(checkpoint, pairs, seed=0, query_volumes=QUERIES, strength=0.5, steps=4)
    assert torch.equal(syn.masks, pairs.masks) and syn.images.shape == pairs.images.shape
    m = syn.manifest
    assert (m["generator"], m["strength"], m["steps"], m["denoising_steps"]) == ("sdedit", 0.5, 4, 2)
    assert m["pairs"] == pairs.manifest["pairs"] and m["pairs_from"]["generator"] == "learned"
    assert {r["volume"] for r in m["training"]["derived"]} == {"2", "5", "6", "7"}  # support, target, donor, model
    assert {r["volume"] for r in m["training"]["pretrain"]} == {"1"}  # what the DDPM itself learned from
    leaky = learned_set(data, donor=QUERIES[0])
    with pytest.raises(LeakageError, match=r"query volumes \['3'\]"):
        sdedit.make_set(checkpoint, leaky, seed=0, query_volumes=QUERIES, strength=0.5, steps=4)


# --- fine-tuning on another source's pairs ------------------------------------------------------------------------

def test_finetune_on_names_the_supports_or_a_volume_source_that_reads_no_label():
    assert FINETUNE_ON[0] == SUPPORTS
    assert all(s in VOLUME_SOURCES and not VOLUME_SOURCES[s].reads_labels for s in FINETUNE_ON[1:])
    for name, gen in GENERATORS.items():
        config = gen.config(resolution=RES)
        assert gen.finetune_source(config) is None
        assert gen.finetune_source(dataclasses.replace(config, finetune_on="learned")) == "learned"
        assert {"finetune_on", "finetune_pairs"} <= set(gen.finetune_fields)  # never re-run the pretraining
        # the fine-tune reads finetune_pairs only when it adds pairs: on the supports alone it changes nothing
        more = dataclasses.replace(config, finetune_pairs=8)
        assert gen.finetune_config(more) == gen.finetune_config(config)
        learned = dataclasses.replace(config, finetune_on="learned")
        assert gen.finetune_config(dataclasses.replace(learned, finetune_pairs=8)) != gen.finetune_config(learned)
        assert gen.stage_config(learned) == gen.stage_config(config)  # the pretraining reads neither
        with pytest.raises(ValueError, match=r"finetune_on='oracle'; valid: \['supports', 'learned'\]"):
            dataclasses.replace(config, finetune_on="oracle")
        with pytest.raises(ValueError, match=r"finetune_pairs must be >= 1"):
            dataclasses.replace(config, finetune_pairs=0)


def test_finetune_pairs_are_the_supports_then_the_set_with_each_row_s_source(data):
    pairs, prov = finetune_pairs(support(data), learned_set(data), fold=0, class_name="liver", setting=1,
                                 query_volumes=QUERIES)
    images, masks = pairs
    assert images.shape == masks.shape == (7, 1, RES, RES)
    assert torch.equal(images[:3], data[0][:3]) and torch.equal(images[3:], data[0][:4])
    assert prov.finetune == refs("2", range(3)) + refs("5", range(4))  # supports, then each pair's target slice
    assert prov.finetune_source == (SUPPORT,) * 3 + ("learned",) * 4
    assert {r.volume for r in prov.derived} == {"2", "5", "6", "7"} and SliceRef("6", 3) in prov.derived
    alone, prov_alone = finetune_pairs(support(data), None, fold=0, class_name="liver", setting=1,
                                       query_volumes=QUERIES)
    assert alone[0].shape[0] == 3 and prov_alone.finetune_source == () and prov_alone.derived == ()
    targets_and_donors = tuple(r for k in range(4) for r in (SliceRef("5", k), SliceRef("6", k)))
    assert set_slices(learned_set(data).manifest) == refs("2", range(3)) + targets_and_donors + refs("7", [0, 1])


def test_a_set_of_another_class_or_with_a_query_volume_is_refused(data):
    other = learned_set(data)
    other.manifest["class_name"] = "spleen"
    with pytest.raises(PairError, match=r"the 'learned' set to fine-tune on is for fold 0, class 'spleen', not fold 0, "
                                        r"class 'liver'"):
        finetune_pairs(support(data), other, fold=0, class_name="liver", setting=1, query_volumes=QUERIES)
    with pytest.raises(LeakageError, match=r"query volumes \['4'\]"):
        finetune_pairs(support(data), learned_set(data, target="4"), fold=0, class_name="liver", setting=1,
                       query_volumes=QUERIES)


@pytest.mark.parametrize("module, make", [(ddpm, tiny_ddpm), (gan, tiny_gan)], ids=["ddpm", "gan"])
def test_fine_tuned_checkpoint_records_where_its_pairs_came_from(module, make, data, tmp_path):
    pairs, prov = finetune_pairs(support(data), learned_set(data), fold=0, class_name="liver", setting=1,
                                 query_volumes=QUERIES)
    base = module.train(make(), pretrain_pairs=data, provenance=provenance(6, 0), out_dir=tmp_path / "base")
    path = module.train(make(finetune_on="learned", finetune_pairs=4), finetune_pairs=pairs, provenance=prov,
                        out_dir=tmp_path / "tuned", init_checkpoint=base)
    recorded = Provenance.from_dict(load_checkpoint(path, kind=module.KIND)["provenance"])
    assert recorded.finetune_source == prov.finetune_source and recorded.derived == prov.derived
    assert recorded.pretrain == refs("1", range(6))  # the init checkpoint's slices, merged
    leaky = dataclasses.replace(prov, derived=prov.derived + (SliceRef(QUERIES[1], 0),))
    with pytest.raises(LeakageError, match=r"1 training slices come from query volumes \['4'\]"):
        module.train(make(), finetune_pairs=pairs, provenance=leaky, out_dir=tmp_path / "leaky", init_checkpoint=base)
    short = dataclasses.replace(prov, finetune_source=prov.finetune_source[:-1])
    with pytest.raises(PairError, match=r"finetune_source names 6 sources for 7 finetune slices"):
        module.train(make(), finetune_pairs=pairs, provenance=short, out_dir=tmp_path / "short", init_checkpoint=base)
    assert not (tmp_path / "leaky").exists() and not (tmp_path / "short").exists()
