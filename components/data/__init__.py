"""Data: readers and writers of the real formats (Vision-Flan/LLaVA JSON, MME folders) and the embedded generator.

Map: `records` (Row, RecordError, DataError) · `visionflan` and `mme` (the two real formats) ·
`paths` (image paths that cannot escape their root) · `scenes`, `render`, `tasks`, `mnist` (the
embedded visionflan-mini content) · `generate` (`write_dataset`, behind `mrt data`) · `load`
(`load_dataset_dir`, what validation, training and the benchmark read). Import the submodule you
need; this package imports nothing heavy on its own.
"""
