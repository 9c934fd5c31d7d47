//! One handle on either backend for the parts of the schema whose SQL is the same on both
//! (users, tokens, API keys, audit, sites and cameras, retention): [`Db`] and the [`on_db!`]
//! macro, which expands one body once per backend so that each query is written once.
//!
//! Portable SQL only: `$1`-style parameters (SQLite accepts them too), `BIGINT` for integers and
//! booleans (0/1), `TEXT` for JSON, `ON CONFLICT`, `RETURNING`.
//!
//! ```ignore
//! let n: i64 = on_db!(db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM users").fetch_one(pool).await)?;
//! ```
//! With SQLite, `pool` is the single writer connection for writes ([`Db::write`]) and the reader
//! pool for reads ([`Db::read`]); with PostgreSQL both are the same pool.

use sqlx::{PgPool, SqlitePool};

use crate::vault::Vault;

/// A backend's connection pools, with the key ring that seals the secret columns
/// ([`crate::vault`]).
#[derive(Debug, Clone)]
pub struct Db {
    pub(in crate::store) pools: Pools,
    vault: Vault,
}

/// The connection pools of one backend.
#[derive(Debug, Clone)]
pub enum Pools {
    Sqlite { writer: SqlitePool, reader: SqlitePool },
    Postgres(PgPool),
}

/// One side of a [`Db`]: where a statement runs.
#[derive(Debug, Clone, Copy)]
pub(in crate::store) enum Pool<'a> {
    Sqlite(&'a SqlitePool),
    Postgres(&'a PgPool),
}

impl Db {
    pub fn new(pools: Pools, vault: Vault) -> Self {
        Self { pools, vault }
    }

    /// The key ring of the secret columns.
    pub fn vault(&self) -> &Vault {
        &self.vault
    }

    /// Where writes go (SQLite: the one writer connection, so writes never meet `SQLITE_BUSY`).
    pub(in crate::store) fn write(&self) -> Pool<'_> {
        match &self.pools {
            Pools::Sqlite { writer, .. } => Pool::Sqlite(writer),
            Pools::Postgres(p) => Pool::Postgres(p),
        }
    }

    /// Where reads go.
    pub(in crate::store) fn read(&self) -> Pool<'_> {
        match &self.pools {
            Pools::Sqlite { reader, .. } => Pool::Sqlite(reader),
            Pools::Postgres(p) => Pool::Postgres(p),
        }
    }

    /// Closes the pools: queries made afterwards fail as [`super::StoreError::Unavailable`]
    /// (shutdown; tests of an unreachable database).
    pub async fn close(&self) {
        match &self.pools {
            Pools::Sqlite { writer, reader } => {
                writer.close().await;
                reader.close().await;
            }
            Pools::Postgres(p) => p.close().await,
        }
    }

    /// Waits until no statement of this database is running: on SQLite every reader connection
    /// free, on PostgreSQL no other active session on the database (a benchmark lets the queries
    /// of abandoned requests finish before its next measurement).
    pub async fn wait_idle(&self) -> Result<(), super::StoreError> {
        match &self.pools {
            Pools::Sqlite { reader, .. } => {
                let mut held = Vec::new();
                for _ in 0..reader.options().get_max_connections() {
                    let mut c = reader.acquire().await?;
                    sqlx::query("SELECT 1").execute(&mut *c).await?;
                    held.push(c);
                }
            }
            Pools::Postgres(p) => loop {
                let busy: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND state = 'active' AND pid <> pg_backend_pid()",
                )
                .fetch_one(p)
                .await?;
                if busy == 0 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            },
        }
        Ok(())
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend(&self) -> &'static str {
        match self.pools {
            Pools::Sqlite { .. } => "sqlite",
            Pools::Postgres(_) => "postgres",
        }
    }

    /// The PostgreSQL pool, when that is the backend.
    pub(in crate::store) fn postgres(&self) -> Option<&PgPool> {
        match &self.pools {
            Pools::Postgres(p) => Some(p),
            Pools::Sqlite { .. } => None,
        }
    }

    pub(in crate::store) fn is_postgres(&self) -> bool {
        self.postgres().is_some()
    }
}

/// Runs `$body` with `$pool` bound to the backend's pool (`&SqlitePool` or `&PgPool`): the body
/// is written once and compiled for both. `$db` is a [`Pool`] (`db.read()` / `db.write()`).
/// For transactions, call `$pool.begin()` inside the body.
macro_rules! on_db {
    ($pool_expr:expr, $pool:ident => $body:expr) => {
        match $pool_expr {
            $crate::store::db::Pool::Sqlite($pool) => $body,
            $crate::store::db::Pool::Postgres($pool) => $body,
        }
    };
}
pub(in crate::store) use on_db;
