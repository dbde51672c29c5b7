//! HTTP plumbing shared by every service router: the error-to-status table, a JSON extractor
//! whose rejections use the dfs error shape, the `Authed` extractor and `/health`.

pub mod authed;
pub mod idle;
pub mod listen;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use common::{ErrorBody, ErrorCode};
use serde::de::DeserializeOwned;

use crate::error::ServiceError;

pub use authed::{Authed, Principal, Verifier};

/// Largest JSON request body accepted by any service.
pub const JSON_BODY_LIMIT: usize = 64 * 1024;

/// A service error on its way out as a JSON response.
#[derive(Debug)]
pub struct AppError(pub ServiceError);

impl From<ServiceError> for AppError {
    fn from(e: ServiceError) -> Self {
        AppError(e)
    }
}

/// The one table from error class to HTTP status.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest
        | ErrorCode::InvalidName
        | ErrorCode::NotDir
        | ErrorCode::IsDir
        | ErrorCode::InvalidMove
        | ErrorCode::NameTooLong => StatusCode::BAD_REQUEST,
        ErrorCode::NotFound | ErrorCode::NoRoute => StatusCode::NOT_FOUND,
        ErrorCode::Exists
        | ErrorCode::NotEmpty
        | ErrorCode::StaleFence
        | ErrorCode::NotHolder
        | ErrorCode::InUse
        | ErrorCode::TooManyLinks => StatusCode::CONFLICT,
        ErrorCode::Unauthorized | ErrorCode::Replay => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden | ErrorCode::AccessDenied | ErrorCode::NotAdministrator => {
            StatusCode::FORBIDDEN
        }
        ErrorCode::NotPrimary => StatusCode::MISDIRECTED_REQUEST,
        ErrorCode::HashMismatch => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Conflict => StatusCode::PRECONDITION_FAILED,
        ErrorCode::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::ProtocolMismatch => StatusCode::UPGRADE_REQUIRED,
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let body: ErrorBody = self.0.to_body();
        (status_of(body.code), Json(body)).into_response()
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, AppError>;

/// `Json` whose rejection (bad JSON, wrong content type, too large) is a dfs [`ErrorBody`].
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::BytesRejection(r))
                if r.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Err(AppError(ServiceError::TooLarge(r.body_text())))
            }
            // A name field over NAME_MAX (`ValidName` refuses it while the body is read):
            // ENAMETOOLONG, as in a path. serde keeps only the message of the refusal.
            Err(r @ JsonRejection::JsonDataError(_))
                if r.body_text()
                    .contains(&format!("bytes long, more than {}", common::name::NAME_MAX)) =>
            {
                Err(AppError(ServiceError::NameTooLong(r.body_text())))
            }
            Err(r) => Err(AppError(ServiceError::BadRequest(r.body_text()))),
        }
    }
}

/// `Path` whose rejection is a dfs [`ErrorBody`].
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|r: PathRejection| AppError(ServiceError::BadRequest(r.body_text())))
    }
}

/// `Query` whose rejection is a dfs [`ErrorBody`].
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|r: QueryRejection| AppError(ServiceError::BadRequest(r.body_text())))
    }
}

/// Runs blocking service logic (store transactions, argon2) off the async worker threads.
pub async fn blocking<T, F>(f: F) -> Result<T, AppError>
where
    F: FnOnce() -> Result<T, ServiceError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AppError(ServiceError::internal("blocking task", e)))?
        .map_err(AppError)
}

/// `GET /health`.
pub async fn health() -> &'static str {
    "ok"
}

/// Answer for unknown routes, in the dfs error shape.
/// Times every routed request by method and route pattern.
async fn track(
    axum::extract::State(metrics): axum::extract::State<std::sync::Arc<crate::metrics::Metrics>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    // A fixed set of methods: an unauthenticated caller must not grow the series without bound.
    let method = match *req.method() {
        axum::http::Method::GET => "GET",
        axum::http::Method::POST => "POST",
        axum::http::Method::PUT => "PUT",
        axum::http::Method::PATCH => "PATCH",
        axum::http::Method::DELETE => "DELETE",
        _ => "OTHER",
    };
    let name = format!("{method} {route}");
    let start = std::time::Instant::now();
    let resp = next.run(req).await;
    metrics.observe("http", &name, start.elapsed());
    resp
}

pub async fn not_found() -> AppError {
    AppError(ServiceError::NoRoute(
        "this service has no such route; check the URL and the kind of service it points at"
            .to_owned(),
    ))
}

/// The protocol version a request speaks: its `x-dfs-protocol` header, 1 without one (clients
/// from before the header); None if the header is not a number.
pub fn request_protocol(headers: &axum::http::HeaderMap) -> Option<u32> {
    match headers.get(common::routes::PROTOCOL_HEADER) {
        None => Some(1),
        Some(v) => v.to_str().ok()?.trim().parse().ok(),
    }
}

/// Refuses a request of a newer protocol than this service speaks (`protocol_mismatch`), and
/// names this service's version on every answer.
async fn protocol(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let theirs = request_protocol(req.headers());
    let mut resp = match theirs {
        Some(v) if v <= common::routes::PROTOCOL_VERSION => next.run(req).await,
        other => {
            let said = other.map_or_else(|| "an unreadable version".to_owned(), |v| v.to_string());
            AppError(ServiceError::ProtocolMismatch(format!(
                "this service speaks dfs protocol {} and the request speaks {said}; upgrade \
                 the service (or use a client of protocol {0} or older)",
                common::routes::PROTOCOL_VERSION
            )))
            .into_response()
        }
    };
    resp.headers_mut().insert(
        common::routes::PROTOCOL_HEADER,
        axum::http::HeaderValue::from(common::routes::PROTOCOL_VERSION),
    );
    resp
}

/// Common layers for a service router: JSON body limit, the body idle bound (`idle`), the
/// verifier, the protocol version check, request tracing, 404s, per-route latency histograms and `GET /metrics`.
pub fn finish(
    router: axum::Router,
    verifier: std::sync::Arc<Verifier>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    body_idle: std::time::Duration,
) -> axum::Router {
    let exposition = metrics.clone();
    router
        .route_layer(axum::middleware::from_fn_with_state(metrics, track))
        .route(
            common::routes::METRICS,
            axum::routing::get(move || {
                let m = exposition.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        )
        .route(common::routes::HEALTH, axum::routing::get(health))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            body_idle,
            idle::bound_body_idle,
        ))
        .layer(axum::Extension(verifier))
        .layer(axum::middleware::from_fn(protocol))
}
