//! The one access-scope condition of every query that lists camera data (events, alerts,
//! rollups, anomalies): what a caller limited to sites or cameras may see.

use sqlx::QueryBuilder;

use super::{CameraRef, Scope};

/// What the rows of a scoped query are about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rows {
    /// Every row names a camera (`device_id`, `camera`).
    Camera,
    /// A row with a NULL `camera` is about the whole device: seen when the scope sees any of the
    /// device's cameras (alerts).
    CameraOrDevice,
}

/// Pushes ` AND <the scope's condition>` for a query `FROM events`: the event's camera is in one
/// of the scope's sites (by the cameras table's effective site) or is one of its cameras.
pub(crate) fn push_events_scope<DB>(qb: &mut QueryBuilder<DB>, scope: &Scope)
where
    DB: sqlx::Database,
    for<'t> &'t str: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    push_scope_condition(qb, scope, "events", Rows::Camera);
}

/// Pushes ` AND <the scope's condition>` for a query whose rows (with `device_id` and `camera`
/// columns) are named `table` (a fixed name from the code, never input): the row's camera is in
/// one of the scope's sites (by the cameras table's effective site) or is one of its cameras.
/// Nothing for [`Scope::All`]; an empty [`Scope::Limited`] pushes a condition that is false.
/// Values with NUL are left out (no stored row holds one).
pub(crate) fn push_scope_condition<DB>(qb: &mut QueryBuilder<DB>, scope: &Scope, table: &'static str, rows: Rows)
where
    DB: sqlx::Database,
    for<'t> &'t str: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    let Scope::Limited { sites, cameras } = scope else {
        return;
    };
    let sites: Vec<&str> = sites.iter().map(String::as_str).filter(|s| !s.contains('\0')).collect();
    let cameras: Vec<&CameraRef> =
        cameras.iter().filter(|c| !c.device_id.contains('\0') && !c.camera.contains('\0')).collect();
    let (camera_is, camera_open) = match rows {
        Rows::Camera => (format!("{table}.camera = "), ""),
        Rows::CameraOrDevice => (format!("({table}.camera IS NULL OR {table}.camera = "), ")"),
    };
    qb.push(" AND (1 = 0");
    if !sites.is_empty() {
        qb.push(format!(
            " OR EXISTS (SELECT 1 FROM cameras sc WHERE sc.device_id = {table}.device_id AND {camera_is}sc.camera{camera_open} \
             AND sc.site_id IN ("
        ));
        for (i, site) in sites.iter().enumerate() {
            if i > 0 {
                qb.push(", ");
            }
            qb.push_bind(*site);
        }
        qb.push("))");
    }
    for c in cameras {
        qb.push(format!(" OR ({table}.device_id = ")).push_bind(c.device_id.as_str());
        qb.push(format!(" AND {camera_is}")).push_bind(c.camera.as_str()).push(camera_open).push(")");
    }
    qb.push(")");
}
