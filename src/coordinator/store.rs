//! SQLite store for the coordinator (rusqlite, bundled). STUB: to be implemented.
//!
//! API contract (callers rely on it):
//! - `Store::open(path)` creates the file/dirs if missing, sets WAL + synchronous=FULL +
//!   foreign_keys, and migrates by `PRAGMA user_version` to `schema.sql`.
//! - `Store::open_in_memory()` for tests.
//! - Every write is committed before the method returns (survives kill -9).
//! - IDs come from SQLite `AUTOINCREMENT`, so they are never reused.

use super::model::{Node, PreAuthKey, User};

/// Store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(String),
    #[error("database schema version {0} is newer than this binary supports ({1})")]
    TooNew(u32, u32),
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

/// The coordinator database.
pub struct Store {}

/// Everything the coordinator loads at start.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub users: Vec<User>,
    pub preauth_keys: Vec<PreAuthKey>,
    pub nodes: Vec<Node>,
}

impl Store {
    pub fn open(_path: &std::path::Path) -> Result<Store, StoreError> { Err(StoreError::Sqlite("unimplemented".into())) }
    pub fn open_in_memory() -> Result<Store, StoreError> { Err(StoreError::Sqlite("unimplemented".into())) }
    pub fn load(&self) -> Result<Snapshot, StoreError> { Ok(Snapshot::default()) }
    /// Inserts `u` (its `id` is ignored) and returns the new id.
    pub fn insert_user(&self, _u: &User) -> Result<u64, StoreError> { Ok(0) }
    pub fn update_user(&self, _u: &User) -> Result<(), StoreError> { Ok(()) }
    pub fn delete_user(&self, _id: u64) -> Result<(), StoreError> { Ok(()) }
    /// Inserts `k` (its `id` is ignored) and returns the new id.
    pub fn insert_preauth_key(&self, _k: &PreAuthKey) -> Result<u64, StoreError> { Ok(0) }
    pub fn update_preauth_key(&self, _k: &PreAuthKey) -> Result<(), StoreError> { Ok(()) }
    /// Inserts `n` (its `id` is ignored) and returns the new id.
    pub fn insert_node(&self, _n: &Node) -> Result<u64, StoreError> { Ok(0) }
    /// Updates every column of node `n.id`.
    pub fn update_node(&self, _n: &Node) -> Result<(), StoreError> { Ok(()) }
    pub fn delete_node(&self, _id: u64) -> Result<(), StoreError> { Ok(()) }
    /// Server secrets and settings (`noise_private_key`, `derp_private_key`, ...).
    pub fn get_kv(&self, _key: &str) -> Result<Option<String>, StoreError> { Ok(None) }
    pub fn set_kv(&self, _key: &str, _value: &str) -> Result<(), StoreError> { Ok(()) }
}
