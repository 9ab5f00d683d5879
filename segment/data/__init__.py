"""Data preparation and the evaluation protocol: dataset specs and volumes, prepared slices, superpixels,
the phantom, the protocol (folds, Settings, EP1/EP2, Dice) and the atomic writer and hasher of the cache."""
