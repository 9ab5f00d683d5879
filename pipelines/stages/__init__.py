"""The stages of an experiment, one small module each, in pipeline order:

- `base`: `Stage` (a frozen dataclass whose key is derived from its fields), `StageEntry`, `StageRunner`;
- `inputs`: support pairs, exclusion sets and synthetic pairs, read by several stages;
- `generators`: `Superpixels`, `GeneratorPretrain`, `GeneratorFinetune` (generators from `augment.registry`);
- `synthesis`: `Synthesis`, `Refine` (another source's pairs remade, e.g. SDEdit), `Quality`;
- `segmenters`: `Segmenter`, `Finetune`;
- `evaluate`: `Evaluate`;
- `report`: `Report`, the run's commit and device;
- `unit`: the plan, the one module that reads the experiment config and wires stages together.

The heavy modules (diffusers, accelerate, albumentations, scikit-image, matplotlib, the models) are
imported inside `produce`, so a run that finds everything cached starts fast.
"""
