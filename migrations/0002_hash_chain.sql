-- Each event carries SHA-256 over its predecessor's hash and its own canonical bytes
-- (fsm_hub/core/chain.py). fsm-hub computes the column for the rows already in the log
-- in the same transaction as this migration.
ALTER TABLE events ADD COLUMN hash BLOB;
