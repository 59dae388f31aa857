"""Data recipes (`python -m train.data.X`): `split_domains` (a mixture -> one file per domain, Mixpert's data split)
and `alignment_tasks` (structured sources -> Chimera stage-1 alignment tasks)."""
