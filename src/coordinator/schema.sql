-- tinyscale coordinator schema: the source of truth for the current `PRAGMA user_version`.
--
-- store.rs runs this file on an empty database. Upgrade steps for older databases must end in
-- exactly this schema; the migration tests compare `sqlite_master` against it (as headscale
-- does with hscontrol/db/schema.sql).
--
-- Conventions:
--   * ids are INTEGER PRIMARY KEY AUTOINCREMENT, so a deleted id is never handed out again;
--   * times are INTEGER Unix seconds (UTC), NULL meaning "never" / "unset";
--   * booleans are INTEGER 0/1;
--   * lists are JSON arrays of strings in TEXT;
--   * keys are stored in Tailscale's text forms (mkey:, nodekey:, discokey:);
--   * addresses are stored in their canonical text form.
-- Comments stay outside the CREATE statements: SQLite keeps statement text verbatim in
-- sqlite_master, and the migration tests compare that text.

CREATE TABLE users (
  id           INTEGER PRIMARY KEY AUTOINCREMENT,
  name         TEXT    NOT NULL UNIQUE,
  display_name TEXT    NOT NULL DEFAULT '',
  created_at   INTEGER NOT NULL
);

-- Keys die with their user; nodes registered with a key keep living (auth_key_id -> NULL).
CREATE TABLE pre_auth_keys (
  id         INTEGER PRIMARY KEY AUTOINCREMENT,
  key        TEXT    NOT NULL UNIQUE,
  user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
  reusable   INTEGER NOT NULL DEFAULT 0 CHECK (reusable IN (0, 1)),
  ephemeral  INTEGER NOT NULL DEFAULT 0 CHECK (ephemeral IN (0, 1)),
  used       INTEGER NOT NULL DEFAULT 0 CHECK (used IN (0, 1)),
  tags       TEXT    NOT NULL DEFAULT '[]',
  created_at INTEGER NOT NULL,
  expiration INTEGER
);
CREATE INDEX idx_pre_auth_keys_user_id ON pre_auth_keys (user_id);

-- A user that still owns nodes cannot be deleted (RESTRICT), as headscale refuses to destroy
-- a user with nodes; the caller deletes or moves the nodes first.
CREATE TABLE nodes (
  id              INTEGER PRIMARY KEY AUTOINCREMENT,
  machine_key     TEXT    NOT NULL UNIQUE,
  node_key        TEXT    NOT NULL UNIQUE,
  disco_key       TEXT    NOT NULL,
  hostname        TEXT    NOT NULL,
  given_name      TEXT    NOT NULL UNIQUE,
  user_id         INTEGER NOT NULL REFERENCES users (id) ON DELETE RESTRICT,
  ipv4            TEXT    UNIQUE,
  ipv6            TEXT    UNIQUE,
  endpoints       TEXT    NOT NULL DEFAULT '[]',
  hostinfo        TEXT    NOT NULL DEFAULT '',
  home_derp       INTEGER NOT NULL DEFAULT 0,
  tags            TEXT    NOT NULL DEFAULT '[]',
  approved_routes TEXT    NOT NULL DEFAULT '[]',
  auth_key_id     INTEGER REFERENCES pre_auth_keys (id) ON DELETE SET NULL,
  ephemeral       INTEGER NOT NULL DEFAULT 0 CHECK (ephemeral IN (0, 1)),
  expiry          INTEGER,
  last_seen       INTEGER,
  created_at      INTEGER NOT NULL
);
CREATE INDEX idx_nodes_user_id ON nodes (user_id);
CREATE INDEX idx_nodes_auth_key_id ON nodes (auth_key_id);

-- Server secrets and settings (noise_private_key, derp_private_key, ...).
CREATE TABLE kv (
  key   TEXT PRIMARY KEY NOT NULL,
  value TEXT NOT NULL
) WITHOUT ROWID;

-- The ACL policy (HuJSON text as the admin set it), version 2. At most one row; none means
-- allow all. Kept verbatim so `policy get` returns the admin's comments and layout.
CREATE TABLE policy (
  id         INTEGER PRIMARY KEY CHECK (id = 1),
  data       TEXT    NOT NULL,
  updated_at INTEGER NOT NULL
);

-- REST API keys, version 3. The key is `<prefix>.<secret>`: only the prefix (shown in lists
-- and logs) and the BLAKE2s-256 hash of the secret (lowercase hex) are stored.
CREATE TABLE api_keys (
  id         INTEGER PRIMARY KEY AUTOINCREMENT,
  prefix     TEXT    NOT NULL UNIQUE,
  hash       TEXT    NOT NULL,
  created_at INTEGER NOT NULL,
  expiration INTEGER,
  last_seen  INTEGER
);
