"""Real software on the LUNs: guest applications nobody here wrote, judged by their own tools.

- `sqlite_app` / `sqlite_check`: a SQLite database (apsw's bundled SQLite) whose main file
  lives on one LUN and whose rollback journal or WAL lives on another, judged by the
  standard library's `sqlite3` (hot-journal / WAL recovery, `PRAGMA integrity_check`).
- `ext4_app` / `ext4_check` (+ `jbd2`, the journal's on-disk format): an ext4 file system
  made by the system's `mke2fs`, changed with `debugfs -w`, each change journaled as jbd2
  does (internal journal, or a journal device on a second LUN), judged by e2fsck's journal
  replay on a copy, `e2fsck -fn` and `debugfs -c`.

The checkers never import the writers; the only format of ours they re-read is the
per-LUN file header documented in `sqlite_app` (file name, size, exists flag), and the
ext4 point-in-time record documented in `ext4_check` (operations, files, state digests).
"""
