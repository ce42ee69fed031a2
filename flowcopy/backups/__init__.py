"""The other half of a backup product: the catalog of images, verify, restore, retention.

- `catalog`: what images exist now (journal + site + files), each ok / gone / failed.
- `verify`: re-read images later and run the independent checker; results journaled.
- `restore`: plan (pure) and the restore unit's stages (the engine drives them).
- `forget`: retention policies (restic's keep_last / keep_daily / keep_weekly) and their
  application (remove only what flowcopy wrote and recorded).
- `rpo`: age of each VM's newest verified backup against the workflow's RPO.
"""
