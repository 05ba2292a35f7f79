-- The event log. The current view is never stored: it is rebuilt by folding these rows.
PRAGMA application_id = 1179864392; -- 'FSMH': tells an fsm-hub log from other SQLite files

CREATE TABLE events (
    seq     INTEGER PRIMARY KEY,          -- global order
    stream  TEXT    NOT NULL,             -- instance id, or 'hub'
    version INTEGER NOT NULL CHECK (version >= 1),
    type    TEXT    NOT NULL,
    at      TEXT    NOT NULL,             -- UTC ISO 8601, microseconds
    data    TEXT    NOT NULL,             -- JSON object
    UNIQUE (stream, version)              -- a conflicting append fails instead of forking a stream
);

-- Names are resolved from announcements without scanning the log.
CREATE INDEX events_announcements ON events (stream)
    WHERE type IN ('instance_discovered', 'instance_updated');
