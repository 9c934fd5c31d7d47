//! Authorisation of every request, in one place.
//!
//! Each endpoint declares what it needs in its OpenAPI annotation:
//! `extensions(("x-permission" = json!("events:read")))` (or `"public"`, or `"authenticated"` for
//! the caller's own account). [`AccessMap::from_openapi`] reads those declarations from the
//! generated document and refuses to build when an operation declares nothing, so an endpoint
//! cannot be added without saying who may call it. [`authorize`] then runs before every handler:
//! no or bad credential → 401, missing permission → 403, otherwise the [`Principal`] is put in
//! the request's extensions for the handler.
//!
//! Default deny: a route that is neither in the map nor in [`PUBLIC_ROUTES`] (the few public
//! routes outside the documented API) is never served: 401 without a credential, 403 with one,
//! whatever its permissions ([`route_access`]). HEAD is answered like GET.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};
use crate::auth::{Access, AuthError, Principal};

/// Name of the OpenAPI extension that declares an operation's access.
pub const PERMISSION_EXTENSION: &str = "x-permission";

/// (method, route template) → access, read from the OpenAPI document.
#[derive(Debug, Clone, Default)]
pub struct AccessMap {
    routes: HashMap<(Method, String), Access>,
}

impl AccessMap {
    /// Reads every operation's `x-permission`; an error names each operation without one (or
    /// with an unknown value).
    pub fn from_openapi(doc: &utoipa::openapi::OpenApi) -> Result<Self, String> {
        let mut routes = HashMap::new();
        let mut problems = Vec::new();
        for (path, item) in &doc.paths.paths {
            for (method, op) in operations(item) {
                let declared = op
                    .extensions
                    .as_ref()
                    .and_then(|e| e.get(PERMISSION_EXTENSION))
                    .and_then(|v| v.as_str())
                    .map(str::to_owned);
                match declared.as_deref().and_then(Access::parse) {
                    Some(access) => {
                        routes.insert((method, path.clone()), access);
                    }
                    None => problems.push(format!("{} {path}: x-permission {:?}", method.as_str(), declared)),
                }
            }
        }
        if problems.is_empty() { Ok(Self { routes }) } else { Err(problems.join("; ")) }
    }

    pub fn get(&self, method: &Method, path: &str) -> Option<Access> {
        self.routes.get(&(method.clone(), path.to_owned())).copied()
    }

    /// Every (method, path, access), sorted: the permission matrix.
    pub fn entries(&self) -> Vec<(Method, String, Access)> {
        let mut v: Vec<_> = self.routes.iter().map(|((m, p), a)| (m.clone(), p.clone(), *a)).collect();
        v.sort_by(|a, b| (a.1.as_str(), a.0.as_str()).cmp(&(b.1.as_str(), b.0.as_str())));
        v
    }
}

/// The operations of a path item with their HTTP methods.
pub fn operations(item: &utoipa::openapi::PathItem) -> Vec<(Method, &utoipa::openapi::path::Operation)> {
    [
        (Method::GET, item.get.as_ref()),
        (Method::PUT, item.put.as_ref()),
        (Method::POST, item.post.as_ref()),
        (Method::DELETE, item.delete.as_ref()),
        (Method::PATCH, item.patch.as_ref()),
        (Method::HEAD, item.head.as_ref()),
        (Method::OPTIONS, item.options.as_ref()),
    ]
    .into_iter()
    .filter_map(|(m, op)| op.map(|o| (m, o)))
    .collect()
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Missing => ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", "authentication required"),
            AuthError::InvalidToken => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "the credential is invalid, expired or revoked",
            ),
            AuthError::InvalidCredentials => {
                ApiError::new(StatusCode::UNAUTHORIZED, "invalid_credentials", "invalid username or password")
            }
            AuthError::InvalidCode => {
                ApiError::new(StatusCode::UNAUTHORIZED, "invalid_code", "invalid or already used code")
            }
            AuthError::TooManyAttempts { retry_after_s } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_attempts",
                "too many failed attempts; try again later",
            )
            .with_retry_after(retry_after_s),
            AuthError::Busy => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "the service is busy checking other passwords; try again in a second",
            )
            .with_retry_after(1),
            AuthError::Invalid(msg) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", msg),
            AuthError::Store(e) => e.into(),
        }
    }
}

/// The client's address: the peer, or (behind a trusted proxy) the forwarded client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub Option<IpAddr>);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
        Ok(ClientIp(peer.map(|p| super::client_addr::client_addr(p, &parts.headers, &state.trusted_proxies))))
    }
}

/// Routes outside the documented API that anyone may GET (and HEAD): the Prometheus scrape and
/// the OpenAPI document itself. Every other route must be declared in the [`AccessMap`].
pub const PUBLIC_ROUTES: &[&str] = &["/metrics", "/api/v1/openapi.json"];

/// What a matched route (method and route template) needs: its declaration in `map` (HEAD: that
/// of GET), [`Access::Public`] for a GET or HEAD of one of the [`PUBLIC_ROUTES`], and `None` for
/// anything else: a route nobody declared, refused to everyone.
pub fn route_access(map: &AccessMap, method: &Method, path: &str) -> Option<Access> {
    let declared = |m: &Method| {
        map.get(m, path).or_else(|| (*m == Method::GET && PUBLIC_ROUTES.contains(&path)).then_some(Access::Public))
    };
    declared(method).or_else(|| if *method == Method::HEAD { declared(&Method::GET) } else { None })
}

/// The middleware: authenticates and authorises by the route's declared access ([`route_access`]).
pub async fn authorize(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let access = path.as_deref().and_then(|p| route_access(&state.access, req.method(), p));
    if access == Some(Access::Public) {
        return next.run(req).await;
    }
    let headers = req.headers();
    let header_str = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (authorization, api_key) = (header_str(header::AUTHORIZATION.as_str()), header_str("x-api-key"));
    let principal = match state.auth.authenticate(authorization.as_deref(), api_key.as_deref()).await {
        Ok(p) => p,
        Err(e) => return unauthorized(e.into()),
    };
    let Some(access) = access else {
        // A route added to the router without a declaration: a bug, refused until it declares.
        let route = path.as_deref().unwrap_or("?");
        tracing::error!(method = %req.method(), route, "route without a declared permission refused");
        return ApiError::new(StatusCode::FORBIDDEN, "forbidden", "this endpoint declares no permission")
            .into_response();
    };
    if let Err(e) = check(&principal, access) {
        return e.into_response();
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

/// Whether the principal may use an endpoint with this access.
pub fn check(principal: &Principal, access: Access) -> Result<(), ApiError> {
    match access {
        Access::Public | Access::Authenticated => Ok(()),
        Access::Requires(_) if principal.mfa_enrolment_only => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "mfa_enrolment_required",
            "your role requires multi-factor authentication: enrol with POST /api/v1/auth/mfa/enroll first",
        )),
        Access::Requires(p) if principal.can(p) => Ok(()),
        Access::Requires(p) => {
            Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("this needs the permission {p}")))
        }
    }
}

fn unauthorized(e: ApiError) -> Response {
    let is_401 = e.status == StatusCode::UNAUTHORIZED;
    let mut resp = e.into_response();
    if is_401 {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"its\""));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Permission;

    #[test]
    fn undeclared_routes_are_refused_and_the_listed_public_ones_are_not() {
        let map = crate::http::access_map().expect("declared");
        let access = |m: Method, p: &str| route_access(&map, &m, p);
        // Declared routes, HEAD like GET.
        assert_eq!(access(Method::GET, "/api/v1/events"), Some(Access::Requires(Permission::EventsRead)));
        assert_eq!(access(Method::HEAD, "/api/v1/events"), Some(Access::Requires(Permission::EventsRead)));
        assert_eq!(access(Method::GET, "/healthz"), Some(Access::Public));
        assert_eq!(access(Method::POST, "/api/v1/auth/login"), Some(Access::Public));
        // The public routes outside the document, GET and HEAD only.
        for p in PUBLIC_ROUTES {
            assert_eq!(access(Method::GET, p), Some(Access::Public), "{p}");
            assert_eq!(access(Method::HEAD, p), Some(Access::Public), "{p}");
            assert_eq!(access(Method::POST, p), None, "{p}");
        }
        // Anything else is nobody's: a route in the router but not in the map, or a method the
        // map does not list for a declared route.
        assert_eq!(access(Method::GET, "/api/v1/undeclared"), None);
        assert_eq!(access(Method::HEAD, "/api/v1/undeclared"), None);
        assert_eq!(access(Method::DELETE, "/api/v1/events"), None);
        assert_eq!(access(Method::GET, "/metrics/extra"), None);
        assert_eq!(route_access(&AccessMap::default(), &Method::GET, "/healthz"), None);
    }
}
