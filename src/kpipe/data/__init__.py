"""Data library: everything between files on disk and uint8 batches.

ingest (train labels from a CSV or class folders, test ids from sample_submission), image (one decoder),
dedup (hashes and duplicate groups), cache (decode-once memmap), loader (datasets, samplers, batches),
device_decode (eval JPEGs decoded on the model's device, infer.decode=gpu), transforms (albumentations
presets, device-side normalise/augment), folds (the folds file: making and reading it), relabels (relabels.csv and labels_clean.csv), pseudo (pseudo-labels for test images). May import the foundation only
(config, errors, io, paths, console).
"""
