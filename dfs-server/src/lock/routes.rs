//! HTTP routes of the lock service: long-poll acquire, renew, release, status.

use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::{Json, Router};
use common::NodeId;
use common::api::{AcquireRequest, AcquireResponse, Grant, LockRequest, LockStatus};
use common::routes;

use super::LockService;
use crate::http::{ApiJson, ApiPath, ApiResult, Authed};

/// The lock router over a shared service.
pub fn router(svc: Arc<LockService>) -> Router {
    Router::new()
        .route(routes::LOCK_ACQUIRE, post(acquire))
        .route(routes::LOCK_RENEW, post(renew))
        .route(routes::LOCK_RELEASE, post(release))
        .route(routes::LOCKS, get(status))
        .route(routes::APPLOCK_LOCK, post(app_lock))
        .route(routes::APPLOCK_UNLOCK, post(app_unlock))
        .route(routes::APPLOCK_TEST, post(app_test))
        .route(routes::APPLOCK_RENEW, post(app_renew))
        .with_state(svc)
}

type State = axum::extract::State<Arc<LockService>>;

async fn acquire(
    axum::extract::State(svc): State,
    Authed(who): Authed,
    ApiPath(id): ApiPath<u64>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<AcquireRequest>,
) -> ApiResult<Json<AcquireResponse>> {
    if matches!(who, crate::http::authed::Principal::User(_)) {
        // Only someone who may write the file queues for its lock: the directory's word.
        let cap = headers
            .get(common::routes::CAPABILITY_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                crate::http::AppError(crate::error::ServiceError::AccessDenied(
                    "no capability: ask the directory for the right to write this file".into(),
                ))
            })?;
        svc.check_capability(cap, NodeId(id))?;
    }
    let wait = Duration::from_millis(req.wait_ms);
    Ok(Json(
        svc.acquire(NodeId(id), &req.waiter, who.name(), wait)
            .await?,
    ))
}

async fn renew(
    axum::extract::State(svc): State,
    _who: Authed,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<LockRequest>,
) -> ApiResult<Json<Grant>> {
    Ok(Json(svc.renew(NodeId(id), &req.waiter).await?))
}

async fn release(
    axum::extract::State(svc): State,
    _who: Authed,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<LockRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    svc.release(NodeId(id), &req.waiter).await?;
    Ok(Json(serde_json::json!({})))
}

async fn status(
    axum::extract::State(svc): State,
    _who: Authed,
) -> ApiResult<Json<Vec<LockStatus>>> {
    Ok(Json(svc.status().await?))
}

async fn app_lock(
    axum::extract::State(svc): State,
    Authed(who): Authed,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<common::api::AppLockRequest>,
) -> ApiResult<Json<common::api::AppLockResponse>> {
    let wait = Duration::from_millis(req.wait_ms);
    Ok(Json(
        svc.app_lock(NodeId(id), &req.owner, req.shared, who.name(), wait)
            .await?,
    ))
}

async fn app_unlock(
    axum::extract::State(svc): State,
    _who: Authed,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<common::api::AppLockQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    svc.app_unlock(NodeId(id), &req.owner).await?;
    Ok(Json(serde_json::json!({})))
}

async fn app_test(
    axum::extract::State(svc): State,
    _who: Authed,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<common::api::AppLockQuery>,
) -> ApiResult<Json<Option<common::api::AppLockConflict>>> {
    Ok(Json(
        svc.app_test(NodeId(id), &req.owner, req.shared).await?,
    ))
}

async fn app_renew(
    axum::extract::State(svc): State,
    _who: Authed,
    ApiJson(req): ApiJson<common::api::AppLockRenew>,
) -> ApiResult<Json<serde_json::Value>> {
    let held = svc.app_renew(&req.session, &req.locks).await?;
    Ok(Json(serde_json::json!({ "held": held })))
}
