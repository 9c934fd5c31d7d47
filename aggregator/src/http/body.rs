//! JSON request bodies and path parameters with the API's error form: a body that is not JSON,
//! has the wrong shape or the wrong content type, or a path segment that does not parse, gets
//! `{"error":{"code","message"}}` and a 4xx, like everything else.

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::ApiError;

/// A JSON body (`Content-Type: application/json`).
#[derive(Debug, Clone)]
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Body(v)),
            Err(rejection) => Err(match rejection {
                JsonRejection::MissingJsonContentType(_) => ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "the body must be JSON with Content-Type: application/json",
                ),
                JsonRejection::JsonDataError(e) => ApiError::invalid_request(clip(&e.body_text())),
                JsonRejection::JsonSyntaxError(e) => {
                    ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", clip(&e.body_text()))
                }
                JsonRejection::BytesRejection(_) => {
                    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", "the request body is too large")
                }
                other => ApiError::invalid_request(clip(&other.body_text())),
            }),
        }
    }
}

fn clip(s: &str) -> String {
    s.chars().take(300).collect()
}

/// Path parameters with the API's error form: a segment that does not parse (a user id that is
/// not an `i64`, bytes that are not UTF-8) is a 400 `invalid_parameter`, not axum's plain text.
#[derive(Debug, Clone)]
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(rejection) => Err(match rejection {
                PathRejection::FailedToDeserializePathParams(e) => ApiError::invalid_parameter(clip(&e.body_text())),
                // A route without the parameters it is declared with: a bug, not the caller's.
                other => ApiError::internal(&other.body_text()),
            }),
        }
    }
}
