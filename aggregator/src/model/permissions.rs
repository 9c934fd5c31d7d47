//! Roles and permissions.
//!
//! A permission names a resource and an action (`events:read`, `devices:write`, ...). A role is a
//! fixed set of permissions ([`Role::permissions`]); API keys carry an explicit subset of their
//! creator's. What each endpoint needs is declared once, in its OpenAPI annotation
//! (`extensions(("x-permission" = json!("events:read")))`, see [`Access`]); the router refuses to
//! start when an endpoint declares nothing.

use serde::{Deserialize, Serialize};

macro_rules! permissions {
    ($( $variant:ident = $name:literal : $doc:literal ),* $(,)?) => {
        /// One resource and action.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum Permission {
            $( #[doc = $doc] $variant ),*
        }

        impl Permission {
            /// Every permission, in declaration order.
            pub const ALL: &'static [Permission] = &[$(Permission::$variant),*];

            /// The public name, `resource:action`.
            pub fn as_str(self) -> &'static str {
                match self { $( Permission::$variant => $name ),* }
            }

            /// What the permission allows, for documentation and the roles endpoint.
            pub fn description(self) -> &'static str {
                match self { $( Permission::$variant => $doc ),* }
            }

            /// Parses a public name.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $( $name => Some(Permission::$variant), )* _ => None }
            }
        }
    };
}

permissions! {
    DevicesRead = "devices:read": "List devices and cameras, with their health.",
    DevicesWrite = "devices:write": "Rename devices and cameras, assign them to sites, disable devices.",
    SitesRead = "sites:read": "List sites.",
    SitesWrite = "sites:write": "Create, rename and delete sites.",
    EventsRead = "events:read": "Query events and their snapshots.",
    MetricsRead = "metrics:read": "Read traffic metrics and anomalies.",
    AlertsRead = "alerts:read": "List alerts.",
    AlertsAck = "alerts:ack": "Acknowledge and resolve alerts.",
    RulesRead = "rules:read": "List alert rules.",
    RulesWrite = "rules:write": "Create, change and delete alert rules.",
    UsersRead = "users:read": "List users, roles and role policies.",
    UsersWrite = "users:write": "Create users, change roles and grants, reset MFA, require MFA for a role.",
    ApiKeysRead = "apikeys:read": "List API keys (never their secrets).",
    ApiKeysWrite = "apikeys:write": "Create and revoke API keys.",
    AuditRead = "audit:read": "Read the audit log.",
    KeysRotate = "keys:rotate": "Rotate the token signing key.",
    OtaRead = "ota:read": "List OTA bundles and rollouts; devices fetch their bundle.",
    OtaDeploy = "ota:deploy": "Upload OTA bundles and start, pause or halt rollouts.",
    SystemRead = "system:read": "Read storage and retention status.",
}

impl Serialize for Permission {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Permission {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Permission::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("unknown permission {s:?}")))
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of permissions (a bit set).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PermissionSet(u64);

const _: () = assert!(Permission::ALL.len() <= 64);

impl PermissionSet {
    pub const EMPTY: PermissionSet = PermissionSet(0);

    pub fn of(perms: &[Permission]) -> Self {
        let mut set = Self::EMPTY;
        for p in perms {
            set.0 |= 1 << (*p as u8);
        }
        set
    }

    pub fn all() -> Self {
        Self::of(Permission::ALL)
    }

    pub fn contains(self, p: Permission) -> bool {
        self.0 & (1 << (p as u8)) != 0
    }

    pub fn is_subset(self, other: PermissionSet) -> bool {
        self.0 & !other.0 == 0
    }

    pub fn intersect(self, other: PermissionSet) -> Self {
        Self(self.0 & other.0)
    }

    pub fn iter(self) -> impl Iterator<Item = Permission> {
        Permission::ALL.iter().copied().filter(move |p| self.contains(*p))
    }

    pub fn names(self) -> Vec<&'static str> {
        self.iter().map(Permission::as_str).collect()
    }
}

/// A user's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, including users, keys and the audit log.
    Admin,
    /// Runs the fleet: devices, sites, alerts, rules and OTA rollouts.
    Operator,
    /// Reads everything about traffic; changes nothing.
    Analyst,
    /// Watches events and alerts, optionally only of some sites or cameras.
    Viewer,
    /// A third-party system reading events, optionally only of some sites or cameras.
    Integrator,
    /// A roadside box fetching what is meant for it (OTA bundles).
    Device,
}

impl Role {
    pub const ALL: &'static [Role] =
        &[Role::Admin, Role::Operator, Role::Analyst, Role::Viewer, Role::Integrator, Role::Device];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Analyst => "analyst",
            Role::Viewer => "viewer",
            Role::Integrator => "integrator",
            Role::Device => "device",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Role::ALL.iter().copied().find(|r| r.as_str() == s)
    }

    /// The role's permissions.
    pub fn permissions(self) -> PermissionSet {
        use Permission::*;
        match self {
            Role::Admin => PermissionSet::all(),
            Role::Operator => PermissionSet::of(&[
                DevicesRead,
                DevicesWrite,
                SitesRead,
                SitesWrite,
                EventsRead,
                MetricsRead,
                AlertsRead,
                AlertsAck,
                RulesRead,
                RulesWrite,
                OtaRead,
                OtaDeploy,
                SystemRead,
            ]),
            Role::Analyst => {
                PermissionSet::of(&[DevicesRead, SitesRead, EventsRead, MetricsRead, AlertsRead, RulesRead, SystemRead])
            }
            Role::Viewer => PermissionSet::of(&[DevicesRead, SitesRead, EventsRead, MetricsRead, AlertsRead]),
            Role::Integrator => PermissionSet::of(&[DevicesRead, SitesRead, EventsRead, MetricsRead]),
            Role::Device => PermissionSet::of(&[OtaRead]),
        }
    }

    /// Whether grants may narrow what the role sees to some sites or cameras.
    pub fn scopable(self) -> bool {
        matches!(self, Role::Viewer | Role::Integrator)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an endpoint needs, as declared by its `x-permission` OpenAPI extension: `"public"`,
/// `"authenticated"` (any valid credential, e.g. the caller's own profile) or a permission name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    Authenticated,
    Requires(Permission),
}

impl Access {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "public" => Some(Access::Public),
            "authenticated" => Some(Access::Authenticated),
            other => Permission::parse(other).map(Access::Requires),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Access::Public => "public",
            Access::Authenticated => "authenticated",
            Access::Requires(p) => p.as_str(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in Permission::ALL {
            assert_eq!(Permission::parse(p.as_str()), Some(*p));
            assert_eq!(Access::parse(p.as_str()), Some(Access::Requires(*p)));
            let (resource, action) = p.as_str().split_once(':').expect("resource:action");
            assert!(!resource.is_empty() && !action.is_empty());
        }
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(*r));
        }
        assert_eq!(Permission::parse("events:delete"), None);
        assert_eq!(Access::parse("public"), Some(Access::Public));
    }

    #[test]
    fn roles_are_nested_where_they_should_be() {
        let p = |r: Role| r.permissions();
        assert_eq!(p(Role::Admin), PermissionSet::all());
        assert!(p(Role::Operator).is_subset(p(Role::Admin)));
        assert!(p(Role::Analyst).is_subset(p(Role::Operator)) || p(Role::Analyst).is_subset(p(Role::Admin)));
        assert!(p(Role::Viewer).is_subset(p(Role::Analyst)));
        assert!(p(Role::Integrator).is_subset(p(Role::Viewer)));
        assert!(!p(Role::Operator).contains(Permission::UsersWrite));
        assert!(!p(Role::Analyst).contains(Permission::DevicesWrite));
        assert!(!p(Role::Viewer).contains(Permission::AlertsAck));
        assert_eq!(p(Role::Device).names(), vec!["ota:read"]);
        let set = PermissionSet::of(&[Permission::EventsRead, Permission::AuditRead]);
        assert_eq!(set.names(), vec!["events:read", "audit:read"]);
        assert!(set.intersect(p(Role::Viewer)) == PermissionSet::of(&[Permission::EventsRead]));
    }
}
