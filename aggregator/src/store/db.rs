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

/// A backend's connection pools.
#[derive(Debug, Clone)]
pub enum Db {
    Sqlite { writer: SqlitePool, reader: SqlitePool },
    Postgres(PgPool),
}

/// One side of a [`Db`]: where a statement runs.
#[derive(Debug, Clone, Copy)]
pub enum Pool<'a> {
    Sqlite(&'a SqlitePool),
    Postgres(&'a PgPool),
}

impl Db {
    /// Where writes go (SQLite: the one writer connection, so writes never meet `SQLITE_BUSY`).
    pub fn write(&self) -> Pool<'_> {
        match self {
            Db::Sqlite { writer, .. } => Pool::Sqlite(writer),
            Db::Postgres(p) => Pool::Postgres(p),
        }
    }

    /// Where reads go.
    pub fn read(&self) -> Pool<'_> {
        match self {
            Db::Sqlite { reader, .. } => Pool::Sqlite(reader),
            Db::Postgres(p) => Pool::Postgres(p),
        }
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend(&self) -> &'static str {
        match self {
            Db::Sqlite { .. } => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }
}

/// Runs `$body` with `$pool` bound to the backend's pool (`&SqlitePool` or `&PgPool`): the body
/// is written once and compiled for both. `$db` is a [`Pool`] (`db.read()` / `db.write()`).
/// For transactions, call `$pool.begin()` inside the body.
#[macro_export]
macro_rules! on_db {
    ($pool_expr:expr, $pool:ident => $body:expr) => {
        match $pool_expr {
            $crate::store::db::Pool::Sqlite($pool) => $body,
            $crate::store::db::Pool::Postgres($pool) => $body,
        }
    };
}
