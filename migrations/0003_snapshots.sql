-- Derived data: the fold's state after event `seq`, so start-up folds only the tail.
-- Deleting rows here changes no answer, only speed.
CREATE TABLE snapshots (
    seq       INTEGER PRIMARY KEY,   -- the last event folded into `state`
    format    INTEGER NOT NULL,      -- fsm_hub.core.view.SNAPSHOT_FORMAT
    head_hash BLOB    NOT NULL,      -- the hash of event `seq`: ties the snapshot to this history
    max_at    TEXT    NOT NULL,      -- the latest `at` folded: usable for `--at` moments after it
    taken_at  TEXT    NOT NULL,
    state     TEXT    NOT NULL       -- JSON, Fold.to_snapshot()
);
