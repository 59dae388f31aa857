"""Training data: `loading` (local JSONL / JSON / parquet files), `collators` (batches for SFT), `export` (rows ->
local files) and `synthetic` (a deterministic six-domain image-QA set with a mixed split, for tiny offline runs)."""
