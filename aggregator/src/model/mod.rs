//! Domain types the store persists and the services act on: pure data, validation and serde,
//! no I/O, no SQL.
//!
//! - [`alerts`]: alert rules (conditions, filters, suppression, escalation) and notification
//!   channels as the API takes them and the store keeps them, with their validation and the
//!   OpenAPI schemas of their constrained values ([`alerts::schema`]).
//! - [`permissions`]: roles, permissions and access levels (what [`crate::auth`] enforces and
//!   the store keeps per user and API key);
//! - [`resolution`]: the rollup resolutions (1 minute, 15 minutes, 1 hour) that the metrics,
//!   anomalies and alert rules share.
//!
//! Dependencies: nothing in the crate except [`crate::netaddr`] (a leaf below the store).

pub mod alerts;
pub mod permissions;
pub mod resolution;

pub use resolution::Resolution;
