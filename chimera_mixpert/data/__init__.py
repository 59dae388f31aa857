"""Training data: `loading` (local JSONL / JSON / parquet files), `collators` (batches for SFT), `export` (rows ->
local files), `synthetic` (a deterministic six-domain image-QA set with a mixed split, for tiny offline runs),
`domains` (a mixture split into per-domain files by source name) and `alignment` (Chimera stage-1 alignment tasks
from structured sources)."""
