//! JSON request bodies and path parameters with the API's error form: a body that is not JSON,
//! has the wrong shape or the wrong content type, is too large or too slow to arrive (408 past
//! `[http] body_timeout_s`, see [`super::transport::TimedBody`]), or a path segment that does not
//! parse, gets `{"error":{"code","message"}}` and a 4xx, like everything else.

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
                JsonRejection::BytesRejection(e) if super::transport::is_body_timeout(&e) => ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    "the request body did not arrive in time",
                ),
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::http::header;
    use futures::StreamExt as _;

    use super::*;
    use crate::http::transport::TimedBody;

    /// A request with a JSON content type whose body is `first` and then nothing, ever.
    fn stalled(first: &'static [u8], timeout: Duration) -> Request {
        let chunks = futures::stream::iter([Ok::<_, std::io::Error>(axum::body::Bytes::from_static(first))])
            .chain(futures::stream::pending());
        let body = TimedBody::new(axum::body::Body::from_stream(chunks), timeout);
        Request::builder()
            .method("POST")
            .header(header::CONTENT_TYPE, "application/json")
            .body(axum::body::Body::new(body))
            .expect("request")
    }

    #[tokio::test]
    async fn a_body_that_stops_is_a_408() {
        let err = Body::<serde_json::Value>::from_request(stalled(b"{\"a\":", Duration::from_millis(50)), &())
            .await
            .expect_err("stalled");
        assert_eq!((err.status, err.code), (StatusCode::REQUEST_TIMEOUT, "body_timeout"));
        // One that arrives in time is read as before.
        let req = Request::builder()
            .method("POST")
            .header(header::CONTENT_TYPE, "application/json")
            .body(axum::body::Body::new(TimedBody::new(axum::body::Body::from("{\"a\":1}"), Duration::from_secs(60))))
            .expect("request");
        let Body(v) = Body::<serde_json::Value>::from_request(req, &()).await.expect("whole body");
        assert_eq!(v, serde_json::json!({"a": 1}));
    }
}
