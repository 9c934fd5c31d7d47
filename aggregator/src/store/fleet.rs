//! Sites, devices and cameras as resources an operator manages, written once for both backends
//! with [`on_db!`](crate::store::db).
//!
//! - A **site** is a place (a junction, a motorway section) with an id (`[A-Za-z0-9._-]`, 1 to 64
//!   characters) and a name.
//! - A **device** (created by its first hello or heartbeat) gets a name, a site and can be
//!   disabled: the ingest then refuses its certificate and closes its live connection.
//! - A **camera** (created when a hello announces it; kept, marked as no longer announced, when a
//!   later hello leaves it out) gets a name and may be assigned a site of its own (an override);
//!   its effective site (`site_id`) is the override, else its device's. Event filters and
//!   [`Scope`]s use the effective site, kept up to date in the same transaction as any change of
//!   either.
//!
//! A [`Scope::Limited`] sees the cameras of its sites and the cameras it names, and a device when
//! it sees at least one of its cameras (with only those cameras, also in the health reports);
//! what it does not see is answered as not found.
//!
//! Writes by a [`Scope::Limited`] caller need its **sites** (a camera granted on its own can be
//! seen, not moved): what a change touches must lie in its sites before the change and after it,
//! checked in the change's own transaction. A device is written only when it and every camera of
//! it are in the caller's sites; a camera only when its effective site is; a new site of either
//! must be one of the caller's, and unassigning (which takes it out of every site) is refused.
//! Something the caller does not see is not found; something it sees but may not change is
//! [`StoreError::Forbidden`].

use std::collections::HashMap;

use its_shared::event::DeviceHealth;
use serde::{Deserialize, Serialize};

use super::{Db, EventId, Scope, StoreError, seq_from_db, seq_to_db};
use crate::store::db::on_db;

/// A device is online when it was last seen (hello or heartbeat) at most this long ago.
pub const ONLINE_WINDOW_MS: i64 = 60_000;
/// Largest page of [`Fleet::health_history`].
pub const MAX_HEALTH_HISTORY_LIMIT: u32 = 10_000;
/// Longest name of a site, device or camera, in characters.
pub const MAX_NAME_CHARS: usize = crate::model::alerts::MAX_NAME;

/// A site, with how many devices are assigned to it and how many cameras are in it (by their
/// effective site).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SiteRecord {
    pub site_id: String,
    pub name: String,
    /// Unix ms, aggregator clock.
    pub created_at_ms: i64,
    pub devices: u64,
    pub cameras: u64,
}

/// A camera of a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct CameraDetail {
    pub device_id: String,
    /// The camera's id on its device (as its hello announces it).
    pub camera: String,
    /// Operator-given name.
    pub name: Option<String>,
    /// Effective site: `site_override` when set, else the device's site.
    pub site_id: Option<String>,
    /// The camera's own site assignment, if any.
    pub site_override: Option<String>,
    /// First hello that announced it, Unix ms, aggregator clock.
    pub first_seen_ms: i64,
    /// Latest hello that announced it, Unix ms, aggregator clock.
    pub last_announced_ms: i64,
    /// Whether the device's latest hello announced it (a camera left out stays, with its events).
    pub announced: bool,
}

/// A device with its management fields, latest health and cameras.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct DeviceDetail {
    /// From its client certificate.
    pub device_id: String,
    /// Operator-given name.
    pub name: Option<String>,
    pub site_id: Option<String>,
    /// A disabled device's connections are refused.
    pub disabled: bool,
    /// When it was disabled, Unix ms, aggregator clock.
    pub disabled_at_ms: Option<i64>,
    /// First hello (or heartbeat), Unix ms, aggregator clock.
    pub first_seen_ms: i64,
    /// Latest hello or heartbeat, Unix ms, aggregator clock.
    pub last_seen_ms: i64,
    /// Seen within the last minute.
    pub online: bool,
    pub agent_version: String,
    pub model: String,
    /// Latest heartbeat's health report.
    #[schema(value_type = Option<Object>)]
    pub last_health: Option<DeviceHealth>,
    /// When that heartbeat arrived, Unix ms, aggregator clock.
    pub last_health_ms: Option<i64>,
    /// Highest sequence number stored for the device (0 if none).
    pub high_water_seq: u64,
    /// Its cameras (for a [`Scope::Limited`], those it sees), by id.
    pub cameras: Vec<CameraDetail>,
}

/// One heartbeat's health report.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct HealthSample {
    /// When it arrived, Unix ms, aggregator clock.
    pub at_ms: i64,
    #[schema(value_type = Object)]
    pub report: DeviceHealth,
}

/// Changes to a device; absent fields stay as they are. In JSON, `null` clears a name or site.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DevicePatch {
    /// `Some(None)` clears the name. 1 to 128 characters without control characters (leading
    /// and trailing spaces are trimmed).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<NameText>, inline)]
    pub name: Option<Option<String>>,
    /// An existing site, or `Some(None)` to unassign. The device's cameras without a site of their
    /// own follow.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<SiteIdText>, inline)]
    pub site_id: Option<Option<String>>,
    /// Disable (its connections are refused) or enable again.
    #[serde(default)]
    pub disabled: Option<bool>,
}

/// Changes to a camera; absent fields stay as they are. In JSON, `null` clears a name or site.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CameraPatch {
    /// `Some(None)` clears the name. 1 to 128 characters without control characters (leading
    /// and trailing spaces are trimmed).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<NameText>, inline)]
    pub name: Option<Option<String>>,
    /// The camera's own site (an existing one), or `Some(None)` to follow its device's again.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<SiteIdText>, inline)]
    pub site_id: Option<Option<String>>,
}

/// A field that is present: `null` is `Some(None)` (absent is `None` through `#[serde(default)]`).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

impl Scope {
    /// Whether the scope sees a camera whose effective site is `site_id`.
    pub fn allows_camera(&self, device_id: &str, camera: &str, site_id: Option<&str>) -> bool {
        match self {
            Scope::All => true,
            Scope::Limited { sites, cameras } => {
                site_id.is_some_and(|s| sites.iter().any(|g| g == s))
                    || cameras.iter().any(|c| c.device_id == device_id && c.camera == camera)
            }
        }
    }
}

// The API's schema of what `validate_site_id` takes (the doc comment is the schema's description).
/// A site id: `[A-Za-z0-9._-]`, 1 to 64 characters.
#[derive(utoipa::ToSchema)]
#[schema(pattern = r"^[A-Za-z0-9._-]{1,64}$")]
#[allow(dead_code)]
pub struct SiteIdText(String);

/// A name in the API's schema ([`valid_name`]): the same as an alert rule's or channel's name.
pub use crate::model::alerts::schema::NameText;

/// Checks a site id: `[A-Za-z0-9._-]`, 1 to 64 characters (as device ids).
pub fn validate_site_id(site_id: &str) -> Result<(), StoreError> {
    if crate::pki::validate_device_id(site_id).is_ok() {
        Ok(())
    } else {
        Err(StoreError::InvalidQuery("a site id is 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', '-'".to_owned()))
    }
}

/// A name as stored: trimmed, 1 to [`MAX_NAME_CHARS`] characters, no control characters.
fn valid_name(what: &str, name: &str) -> Result<String, StoreError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(StoreError::InvalidQuery(format!(
            "a {what} name is 1 to {MAX_NAME_CHARS} characters without control characters"
        )));
    }
    Ok(name.to_owned())
}

/// `name` of a patch, checked.
fn patched_name(what: &str, name: &Option<Option<String>>) -> Result<Option<Option<String>>, StoreError> {
    Ok(match name {
        Some(Some(n)) => Some(Some(valid_name(what, n)?)),
        Some(None) => Some(None),
        None => None,
    })
}

/// A text the database cannot hold (PostgreSQL refuses NUL) names nothing stored.
fn has_nul(s: &str) -> bool {
    s.contains('\0')
}

fn device_not_found(device_id: &str) -> StoreError {
    StoreError::NotFound(format!("device {device_id}"))
}

fn camera_not_found(device_id: &str, camera: &str) -> StoreError {
    StoreError::NotFound(format!("camera {device_id}/{camera}"))
}

fn site_not_found(site_id: &str) -> StoreError {
    StoreError::NotFound(format!("site {site_id}"))
}

fn no_such_site(site_id: &str) -> StoreError {
    StoreError::InvalidQuery(format!("site {site_id} does not exist"))
}

/// A foreign key violation is a conflict (a concurrent change assigned or removed a site).
fn conflict_on_fk(e: sqlx::Error, message: impl FnOnce() -> String) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_foreign_key_violation() => StoreError::Conflict(message()),
        _ => StoreError::from(e),
    }
}

const SITE_SELECT: &str = "SELECT s.site_id, s.name, s.created_at_ms, \
     CAST((SELECT COUNT(*) FROM devices d WHERE d.site_id = s.site_id) AS BIGINT) AS devices, \
     CAST((SELECT COUNT(*) FROM cameras c WHERE c.site_id = s.site_id) AS BIGINT) AS cameras FROM sites s";

#[derive(sqlx::FromRow)]
struct SiteRow {
    site_id: String,
    name: String,
    created_at_ms: i64,
    devices: i64,
    cameras: i64,
}

fn site_from_row(
    SiteRow { site_id, name, created_at_ms, devices, cameras }: SiteRow,
) -> Result<SiteRecord, StoreError> {
    Ok(SiteRecord {
        site_id,
        name,
        created_at_ms,
        devices: super::count_from_db(devices)?,
        cameras: super::count_from_db(cameras)?,
    })
}

const DEVICE_SELECT: &str = "SELECT d.device_id, d.name, d.site_id, d.disabled_at_ms, d.first_seen_ms, \
     d.last_seen_ms, d.agent_version, d.model, CAST(d.last_health AS TEXT) AS last_health, d.last_health_ms, \
     CAST(COALESCE((SELECT MAX(e.seq) FROM events e WHERE e.device_id = d.device_id), 0) AS BIGINT) AS high_water \
     FROM devices d";

#[derive(sqlx::FromRow)]
struct DeviceRow {
    device_id: String,
    name: Option<String>,
    site_id: Option<String>,
    disabled_at_ms: Option<i64>,
    first_seen_ms: i64,
    last_seen_ms: i64,
    agent_version: String,
    model: String,
    last_health: Option<String>,
    last_health_ms: Option<i64>,
    high_water: i64,
}

fn device_from_row(row: DeviceRow, now_ms: i64) -> Result<DeviceDetail, StoreError> {
    let DeviceRow {
        device_id,
        name,
        site_id,
        disabled_at_ms,
        first_seen_ms,
        last_seen_ms,
        agent_version,
        model,
        last_health: health,
        last_health_ms: hms,
        high_water: hw,
    } = row;
    let last_health = health
        .map(|h| serde_json::from_str::<DeviceHealth>(&h))
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("health of device {device_id}: {e}")))?;
    Ok(DeviceDetail {
        name,
        site_id,
        disabled: disabled_at_ms.is_some(),
        disabled_at_ms,
        first_seen_ms,
        last_seen_ms,
        online: now_ms.saturating_sub(last_seen_ms) <= ONLINE_WINDOW_MS,
        agent_version,
        model,
        last_health,
        last_health_ms: hms,
        high_water_seq: seq_from_db(hw)?,
        cameras: Vec::new(),
        device_id,
    })
}

const CAMERA_SELECT: &str = "SELECT device_id, camera, name, site_id, site_override, first_seen_ms, \
     last_announced_ms, announced FROM cameras";

#[derive(sqlx::FromRow)]
struct CameraRow {
    device_id: String,
    camera: String,
    name: Option<String>,
    site_id: Option<String>,
    site_override: Option<String>,
    first_seen_ms: i64,
    last_announced_ms: i64,
    announced: i64,
}

fn camera_from_row(row: CameraRow) -> CameraDetail {
    let CameraRow { device_id, camera, name, site_id, site_override, first_seen_ms, last_announced_ms, announced } =
        row;
    CameraDetail {
        device_id,
        camera,
        name,
        site_id,
        site_override,
        first_seen_ms,
        last_announced_ms,
        announced: announced != 0,
    }
}

fn camera_visible(scope: &Scope, c: &CameraDetail) -> bool {
    scope.allows_camera(&c.device_id, &c.camera, c.site_id.as_deref())
}

/// A limited scope sees, in a device's latest health report, only the cameras it sees.
fn narrow_health(d: &mut DeviceDetail, scope: &Scope) {
    if let (Scope::Limited { .. }, Some(h)) = (scope, d.last_health.as_mut()) {
        let seen: Vec<&str> = d.cameras.iter().map(|c| c.camera.as_str()).collect();
        h.cameras.retain(|c| seen.contains(&c.camera.as_str()));
    }
}

/// Sites, devices and cameras on either backend.
#[derive(Debug, Clone)]
pub struct Fleet {
    db: Db,
}

impl Fleet {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    // -- Sites ----------------------------------------------------------------------------------

    /// All sites, by id.
    pub async fn list_sites(&self) -> Result<Vec<SiteRecord>, StoreError> {
        let sql = format!("{SITE_SELECT} ORDER BY s.site_id");
        let rows: Vec<SiteRow> =
            on_db!(self.db.read(), pool => sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await)?;
        rows.into_iter().map(site_from_row).collect()
    }

    /// One site; `NotFound` when there is none.
    pub async fn get_site(&self, site_id: &str) -> Result<SiteRecord, StoreError> {
        if validate_site_id(site_id).is_err() {
            return Err(site_not_found(site_id));
        }
        let sql = format!("{SITE_SELECT} WHERE s.site_id = $1");
        let row: Option<SiteRow> = on_db!(self.db.read(), pool =>
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(site_id).fetch_optional(pool).await)?;
        site_from_row(row.ok_or_else(|| site_not_found(site_id))?)
    }

    /// Creates a site; `Conflict` when the id is taken, `InvalidQuery` for an invalid id or name.
    pub async fn create_site(&self, site_id: &str, name: &str, now_ms: i64) -> Result<SiteRecord, StoreError> {
        validate_site_id(site_id)?;
        let name = valid_name("site", name)?;
        let done = on_db!(self.db.write(), pool => sqlx::query(
            "INSERT INTO sites (site_id, name, created_at_ms) VALUES ($1, $2, $3) ON CONFLICT (site_id) DO NOTHING",
        )
        .bind(site_id)
        .bind(name.as_str())
        .bind(now_ms)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
        if done == 0 {
            return Err(StoreError::Conflict(format!("site {site_id} already exists")));
        }
        Ok(SiteRecord { site_id: site_id.to_owned(), name, created_at_ms: now_ms, devices: 0, cameras: 0 })
    }

    /// Renames a site; `NotFound` when there is none.
    pub async fn rename_site(&self, site_id: &str, name: &str) -> Result<SiteRecord, StoreError> {
        if validate_site_id(site_id).is_err() {
            return Err(site_not_found(site_id));
        }
        let name = valid_name("site", name)?;
        let done = on_db!(self.db.write(), pool => sqlx::query("UPDATE sites SET name = $2 WHERE site_id = $1")
            .bind(site_id)
            .bind(name.as_str())
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))?;
        if done == 0 {
            return Err(site_not_found(site_id));
        }
        self.get_site(site_id).await
    }

    /// Deletes a site; `Conflict` while devices or cameras are assigned to it, `NotFound` when
    /// there is none.
    pub async fn delete_site(&self, site_id: &str) -> Result<(), StoreError> {
        if validate_site_id(site_id).is_err() {
            return Err(site_not_found(site_id));
        }
        let in_use = || format!("site {site_id} still has devices or cameras assigned");
        on_db!(self.db.write(), pool => {
            let mut tx = pool.begin().await?;
            let (devices, cameras): (i64, i64) = sqlx::query_as(
                "SELECT CAST((SELECT COUNT(*) FROM devices WHERE site_id = $1) AS BIGINT), \
                 CAST((SELECT COUNT(*) FROM cameras WHERE site_id = $1 OR site_override = $1) AS BIGINT)",
            )
            .bind(site_id)
            .fetch_one(&mut *tx)
            .await?;
            if devices > 0 || cameras > 0 {
                return Err(StoreError::Conflict(format!(
                    "site {site_id} still has {devices} device(s) and {cameras} camera(s) assigned"
                )));
            }
            let done = sqlx::query("DELETE FROM sites WHERE site_id = $1")
                .bind(site_id)
                .execute(&mut *tx)
                .await
                .map_err(|e| conflict_on_fk(e, in_use))?;
            if done.rows_affected() == 0 {
                return Err(site_not_found(site_id));
            }
            tx.commit().await.map_err(|e| conflict_on_fk(e, in_use))?;
        });
        Ok(())
    }

    // -- Devices --------------------------------------------------------------------------------

    /// The devices the scope sees (all for [`Scope::All`]; for a limited one, those with at least
    /// one camera it sees, with only those cameras), by id.
    pub async fn list_devices(&self, scope: &Scope) -> Result<Vec<DeviceDetail>, StoreError> {
        let device_sql = format!("{DEVICE_SELECT} ORDER BY d.device_id");
        let camera_sql = format!("{CAMERA_SELECT} ORDER BY device_id, camera");
        let (devices, cameras): (Vec<DeviceRow>, Vec<CameraRow>) = on_db!(self.db.read(), pool => {
            let devices = sqlx::query_as(sqlx::AssertSqlSafe(device_sql)).fetch_all(pool).await?;
            let cameras = sqlx::query_as(sqlx::AssertSqlSafe(camera_sql)).fetch_all(pool).await?;
            (devices, cameras)
        });
        let mut by_device: HashMap<String, Vec<CameraDetail>> = HashMap::new();
        for c in cameras.into_iter().map(camera_from_row).filter(|c| camera_visible(scope, c)) {
            by_device.entry(c.device_id.clone()).or_default().push(c);
        }
        let now = crate::unix_ms();
        let mut out = Vec::new();
        for row in devices {
            let mut d = device_from_row(row, now)?;
            match by_device.remove(&d.device_id) {
                Some(cameras) => d.cameras = cameras,
                None if matches!(scope, Scope::Limited { .. }) => continue,
                None => {}
            }
            narrow_health(&mut d, scope);
            out.push(d);
        }
        Ok(out)
    }

    /// One device as the scope sees it; `NotFound` when there is none or the scope does not see it.
    pub async fn get_device(&self, device_id: &str, scope: &Scope) -> Result<DeviceDetail, StoreError> {
        if has_nul(device_id) {
            return Err(device_not_found(device_id));
        }
        let device_sql = format!("{DEVICE_SELECT} WHERE d.device_id = $1");
        let camera_sql = format!("{CAMERA_SELECT} WHERE device_id = $1 ORDER BY camera");
        let (device, cameras): (Option<DeviceRow>, Vec<CameraRow>) = on_db!(self.db.read(), pool => {
            let device = sqlx::query_as(sqlx::AssertSqlSafe(device_sql)).bind(device_id).fetch_optional(pool).await?;
            let cameras = sqlx::query_as(sqlx::AssertSqlSafe(camera_sql)).bind(device_id).fetch_all(pool).await?;
            (device, cameras)
        });
        let mut d = device_from_row(device.ok_or_else(|| device_not_found(device_id))?, crate::unix_ms())?;
        d.cameras = cameras.into_iter().map(camera_from_row).filter(|c| camera_visible(scope, c)).collect();
        if matches!(scope, Scope::Limited { .. }) && d.cameras.is_empty() {
            return Err(device_not_found(device_id));
        }
        narrow_health(&mut d, scope);
        Ok(d)
    }

    /// Changes a device's name, site or disablement in one transaction (its cameras without a site
    /// of their own follow a new site). `NotFound` for an unknown device, `InvalidQuery` for a
    /// site that does not exist or an invalid name. Disabling keeps the first disablement time.
    pub async fn update_device(
        &self,
        device_id: &str,
        patch: &DevicePatch,
        scope: &Scope,
        now_ms: i64,
    ) -> Result<DeviceDetail, StoreError> {
        if has_nul(device_id) {
            return Err(device_not_found(device_id));
        }
        let name = patched_name("device", &patch.name)?;
        if let Some(Some(site)) = &patch.site_id
            && validate_site_id(site).is_err()
        {
            return Err(no_such_site(site));
        }
        on_db!(self.db.write(), pool => {
            let mut tx = pool.begin().await?;
            let found: Option<(Option<String>,)> = sqlx::query_as("SELECT site_id FROM devices WHERE device_id = $1")
                .bind(device_id)
                .fetch_optional(&mut *tx)
                .await?;
            let Some((current_site,)) = found else {
                return Err(device_not_found(device_id));
            };
            if let Scope::Limited { sites, .. } = scope {
                let cameras: Vec<(String, Option<String>)> =
                    sqlx::query_as("SELECT camera, site_id FROM cameras WHERE device_id = $1")
                        .bind(device_id)
                        .fetch_all(&mut *tx)
                        .await?;
                if !cameras.iter().any(|(c, site)| scope.allows_camera(device_id, c, site.as_deref())) {
                    return Err(device_not_found(device_id));
                }
                let mine = |site: &Option<String>| site.as_ref().is_some_and(|s| sites.contains(s));
                if !mine(&current_site) || !cameras.iter().all(|(_, site)| mine(site)) {
                    return Err(StoreError::Forbidden(format!(
                        "device {device_id} or some of its cameras are outside your sites"
                    )));
                }
                if let Some(target) = &patch.site_id
                    && !mine(target)
                {
                    return Err(StoreError::Forbidden(
                        "a device can be moved only to one of your sites".to_owned(),
                    ));
                }
            }
            if let Some(name) = &name {
                sqlx::query("UPDATE devices SET name = $2 WHERE device_id = $1")
                    .bind(device_id)
                    .bind(name.as_deref())
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(site) = &patch.site_id {
                if let Some(site) = site {
                    let exists: Option<(String,)> = sqlx::query_as("SELECT site_id FROM sites WHERE site_id = $1")
                        .bind(site.as_str())
                        .fetch_optional(&mut *tx)
                        .await?;
                    if exists.is_none() {
                        return Err(no_such_site(site));
                    }
                }
                let gone = || format!("site {} was deleted meanwhile", site.as_deref().unwrap_or_default());
                sqlx::query("UPDATE devices SET site_id = $2 WHERE device_id = $1")
                    .bind(device_id)
                    .bind(site.as_deref())
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| conflict_on_fk(e, gone))?;
                sqlx::query("UPDATE cameras SET site_id = $2 WHERE device_id = $1 AND site_override IS NULL")
                    .bind(device_id)
                    .bind(site.as_deref())
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| conflict_on_fk(e, gone))?;
            }
            match patch.disabled {
                Some(true) => {
                    sqlx::query(
                        "UPDATE devices SET disabled_at_ms = COALESCE(disabled_at_ms, $2) WHERE device_id = $1",
                    )
                    .bind(device_id)
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await?;
                }
                Some(false) => {
                    sqlx::query("UPDATE devices SET disabled_at_ms = NULL WHERE device_id = $1")
                        .bind(device_id)
                        .execute(&mut *tx)
                        .await?;
                }
                None => {}
            }
            tx.commit().await?;
        });
        self.get_device(device_id, &Scope::All).await
    }

    /// Ids of the disabled devices, ascending.
    pub async fn disabled_devices(&self) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> = on_db!(self.db.read(), pool => sqlx::query_as(
            "SELECT device_id FROM devices WHERE disabled_at_ms IS NOT NULL ORDER BY device_id",
        )
        .fetch_all(pool)
        .await)?;
        Ok(rows.into_iter().map(|(d,)| d).collect())
    }

    /// Whether the device is disabled (an unknown device is not).
    pub async fn is_device_disabled(&self, device_id: &str) -> Result<bool, StoreError> {
        if has_nul(device_id) {
            return Ok(false);
        }
        let row: Option<(Option<i64>,)> = on_db!(self.db.read(), pool => sqlx::query_as(
            "SELECT disabled_at_ms FROM devices WHERE device_id = $1",
        )
        .bind(device_id)
        .fetch_optional(pool)
        .await)?;
        Ok(row.is_some_and(|(at,)| at.is_some()))
    }

    /// Health reports of a device with `from_ms <= at_ms < to_ms` (bounds optional), newest
    /// first, at most `limit` (1..=[`MAX_HEALTH_HISTORY_LIMIT`]). `NotFound` for an unknown
    /// device.
    /// For a [`Scope::Limited`], each report shows only the cameras the scope sees (the caller
    /// checks that it sees the device).
    pub async fn health_history(
        &self,
        device_id: &str,
        from_ms: Option<i64>,
        to_ms: Option<i64>,
        limit: u32,
        scope: &Scope,
    ) -> Result<Vec<HealthSample>, StoreError> {
        if !(1..=MAX_HEALTH_HISTORY_LIMIT).contains(&limit) {
            return Err(StoreError::InvalidQuery(format!("limit must be between 1 and {MAX_HEALTH_HISTORY_LIMIT}")));
        }
        if let (Some(from), Some(to)) = (from_ms, to_ms)
            && from > to
        {
            return Err(StoreError::InvalidQuery("from must not be after to".to_owned()));
        }
        if has_nul(device_id) {
            return Err(device_not_found(device_id));
        }
        let (found, rows): (Option<(String,)>, Vec<(i64, String)>) = on_db!(self.db.read(), pool => {
            let found = sqlx::query_as("SELECT device_id FROM devices WHERE device_id = $1")
                .bind(device_id)
                .fetch_optional(pool)
                .await?;
            let rows = sqlx::query_as(
                "SELECT at_ms, CAST(report AS TEXT) FROM device_health \
                 WHERE device_id = $1 AND at_ms >= $2 AND at_ms < $3 ORDER BY at_ms DESC LIMIT $4",
            )
            .bind(device_id)
            .bind(from_ms.unwrap_or(i64::MIN))
            .bind(to_ms.unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?;
            (found, rows)
        });
        if found.is_none() {
            return Err(device_not_found(device_id));
        }
        let seen: Option<Vec<String>> = match scope {
            Scope::All => None,
            Scope::Limited { .. } => {
                Some(self.list_cameras(scope, Some(device_id), None).await?.into_iter().map(|c| c.camera).collect())
            }
        };
        rows.into_iter()
            .map(|(at_ms, text)| {
                let mut report: DeviceHealth = serde_json::from_str(&text)
                    .map_err(|e| StoreError::Corrupt(format!("health of device {device_id} at {at_ms}: {e}")))?;
                if let Some(seen) = &seen {
                    report.cameras.retain(|c| seen.contains(&c.camera));
                }
                Ok(HealthSample { at_ms, report })
            })
            .collect()
    }

    // -- Cameras --------------------------------------------------------------------------------

    /// The cameras the scope sees, optionally of one device and/or in one (effective) site, by
    /// device and id.
    pub async fn list_cameras(
        &self,
        scope: &Scope,
        device: Option<&str>,
        site: Option<&str>,
    ) -> Result<Vec<CameraDetail>, StoreError> {
        if device.is_some_and(has_nul) || site.is_some_and(has_nul) {
            return Ok(Vec::new());
        }
        let sql = format!(
            "{CAMERA_SELECT} WHERE ($1 IS NULL OR device_id = $1) AND ($2 IS NULL OR site_id = $2) \
             ORDER BY device_id, camera"
        );
        let rows: Vec<CameraRow> = on_db!(self.db.read(), pool => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(device)
            .bind(site)
            .fetch_all(pool)
            .await)?;
        Ok(rows.into_iter().map(camera_from_row).filter(|c| camera_visible(scope, c)).collect())
    }

    /// One camera as the scope sees it; `NotFound` when there is none or the scope does not see it.
    pub async fn get_camera(&self, device_id: &str, camera: &str, scope: &Scope) -> Result<CameraDetail, StoreError> {
        if has_nul(device_id) || has_nul(camera) {
            return Err(camera_not_found(device_id, camera));
        }
        let sql = format!("{CAMERA_SELECT} WHERE device_id = $1 AND camera = $2");
        let row: Option<CameraRow> = on_db!(self.db.read(), pool => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(device_id)
            .bind(camera)
            .fetch_optional(pool)
            .await)?;
        row.map(camera_from_row).filter(|c| camera_visible(scope, c)).ok_or_else(|| camera_not_found(device_id, camera))
    }

    /// Changes a camera's name or own site in one transaction (`Some(None)` for the site: follow
    /// the device's again). `NotFound` for an unknown camera, `InvalidQuery` for a site that does
    /// not exist or an invalid name.
    pub async fn update_camera(
        &self,
        device_id: &str,
        camera: &str,
        patch: &CameraPatch,
        scope: &Scope,
    ) -> Result<CameraDetail, StoreError> {
        if has_nul(device_id) || has_nul(camera) {
            return Err(camera_not_found(device_id, camera));
        }
        let name = patched_name("camera", &patch.name)?;
        if let Some(Some(site)) = &patch.site_id
            && validate_site_id(site).is_err()
        {
            return Err(no_such_site(site));
        }
        on_db!(self.db.write(), pool => {
            let mut tx = pool.begin().await?;
            let found: Option<(Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT c.site_id, d.site_id FROM cameras c JOIN devices d ON d.device_id = c.device_id \
                 WHERE c.device_id = $1 AND c.camera = $2",
            )
            .bind(device_id)
            .bind(camera)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((current_site, device_site)) = found else {
                return Err(camera_not_found(device_id, camera));
            };
            if let Scope::Limited { sites, .. } = scope {
                if !scope.allows_camera(device_id, camera, current_site.as_deref()) {
                    return Err(camera_not_found(device_id, camera));
                }
                let mine = |site: &Option<String>| site.as_ref().is_some_and(|s| sites.contains(s));
                if !mine(&current_site) {
                    return Err(StoreError::Forbidden(format!("camera {device_id}/{camera} is outside your sites")));
                }
                let target = match &patch.site_id {
                    Some(Some(site)) => Some(Some(site.clone())),
                    Some(None) => Some(device_site.clone()),
                    None => None,
                };
                if let Some(target) = &target
                    && !mine(target)
                {
                    return Err(StoreError::Forbidden(
                        "a camera can be moved only to one of your sites".to_owned(),
                    ));
                }
            }
            if let Some(name) = &name {
                sqlx::query("UPDATE cameras SET name = $3 WHERE device_id = $1 AND camera = $2")
                    .bind(device_id)
                    .bind(camera)
                    .bind(name.as_deref())
                    .execute(&mut *tx)
                    .await?;
            }
            match &patch.site_id {
                Some(Some(site)) => {
                    let exists: Option<(String,)> = sqlx::query_as("SELECT site_id FROM sites WHERE site_id = $1")
                        .bind(site.as_str())
                        .fetch_optional(&mut *tx)
                        .await?;
                    if exists.is_none() {
                        return Err(no_such_site(site));
                    }
                    sqlx::query(
                        "UPDATE cameras SET site_override = $3, site_id = $3 WHERE device_id = $1 AND camera = $2",
                    )
                    .bind(device_id)
                    .bind(camera)
                    .bind(site.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| conflict_on_fk(e, || format!("site {site} was deleted meanwhile")))?;
                }
                Some(None) => {
                    sqlx::query(
                        "UPDATE cameras SET site_override = NULL, \
                         site_id = (SELECT d.site_id FROM devices d WHERE d.device_id = $1) \
                         WHERE device_id = $1 AND camera = $2",
                    )
                    .bind(device_id)
                    .bind(camera)
                    .execute(&mut *tx)
                    .await?;
                }
                None => {}
            }
            tx.commit().await?;
        });
        self.get_camera(device_id, camera, &Scope::All).await
    }

    // -- Events ---------------------------------------------------------------------------------

    /// Whether the event is stored and the scope sees its camera (the API answers 404 otherwise,
    /// so that a caller cannot tell an event outside its scope from a missing one).
    pub async fn event_visible(&self, id: &EventId, scope: &Scope) -> Result<bool, StoreError> {
        let Ok(seq) = seq_to_db(id.seq) else {
            return Ok(false); // nothing is stored above i64::MAX
        };
        if has_nul(&id.device_id) {
            return Ok(false);
        }
        let row: Option<(String, Option<String>)> = on_db!(self.db.read(), pool => sqlx::query_as(
            "SELECT e.camera, c.site_id FROM events e \
             LEFT JOIN cameras c ON c.device_id = e.device_id AND c.camera = e.camera \
             WHERE e.device_id = $1 AND e.seq = $2",
        )
        .bind(id.device_id.as_str())
        .bind(seq)
        .fetch_optional(pool)
        .await)?;
        Ok(row.is_some_and(|(camera, site)| scope.allows_camera(&id.device_id, &camera, site.as_deref())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::CameraRef;

    #[test]
    fn patches_tell_null_from_absent() {
        let p: DevicePatch = serde_json::from_str(r#"{"name": null, "disabled": true}"#).expect("patch");
        assert_eq!(p, DevicePatch { name: Some(None), site_id: None, disabled: Some(true) });
        let p: DevicePatch = serde_json::from_str(r#"{"site_id": "s1"}"#).expect("patch");
        assert_eq!(p.site_id, Some(Some("s1".to_owned())));
        assert_eq!(p.name, None);
        assert!(serde_json::from_str::<DevicePatch>(r#"{"colour": "red"}"#).is_err());
        let c: CameraPatch = serde_json::from_str(r#"{"site_id": null, "name": "North"}"#).expect("patch");
        assert_eq!(c, CameraPatch { name: Some(Some("North".to_owned())), site_id: Some(None) });
    }

    #[test]
    fn scopes_allow_by_site_or_camera() {
        let scope = Scope::Limited {
            sites: vec!["s1".into()],
            cameras: vec![CameraRef { device_id: "d2".into(), camera: "c9".into() }],
        };
        assert!(scope.allows_camera("d1", "c1", Some("s1")));
        assert!(!scope.allows_camera("d1", "c1", Some("s2")));
        assert!(!scope.allows_camera("d1", "c1", None));
        assert!(scope.allows_camera("d2", "c9", None));
        assert!(!scope.allows_camera("d2", "c8", None));
        assert!(Scope::All.allows_camera("x", "y", None));
        assert!(!Scope::Limited { sites: vec![], cameras: vec![] }.allows_camera("d1", "c1", Some("s1")));
    }

    #[test]
    fn names_and_site_ids_are_checked() {
        assert_eq!(valid_name("site", "  North junction ").expect("name"), "North junction");
        for bad in ["", "   ", "a\nb", &"x".repeat(MAX_NAME_CHARS + 1)] {
            assert!(valid_name("site", bad).is_err(), "{bad:?}");
        }
        assert!(validate_site_id("north-1.a_b").is_ok());
        for bad in ["", "a b", "a/b", "é", &"x".repeat(65)] {
            assert!(validate_site_id(bad).is_err(), "{bad:?}");
        }
    }
}
