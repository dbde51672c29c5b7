//! HTTP routes of the auth service: public key, signup, login, refresh, and the administrator's
//! users and groups.

use std::sync::Arc;

use axum::routing::{get, post};
use axum::{Json, Router};
use common::api::{Envelope, PublicKeyResponse, RefreshRequest, TokenResponse};
use common::routes;

use super::AuthService;
use crate::error::ServiceError;
use crate::http::authed::ClusterOnly;
use crate::http::listen::ClientAddr;
use crate::http::{ApiJson, ApiResult, AppError, blocking};

/// The auth router over a shared service.
pub fn router(svc: Arc<AuthService>) -> Router {
    Router::new()
        .route(routes::AUTH_PUBLIC_KEY, get(public_key))
        .route(routes::AUTH_SIGNUP, post(signup))
        .route(routes::AUTH_LOGIN, post(login))
        .route(routes::AUTH_REFRESH, post(refresh))
        .route(routes::AUTH_USERS, get(users))
        .route(routes::AUTH_USER, axum::routing::patch(set_user))
        .route(routes::AUTH_GROUPS, get(groups))
        .route(routes::AUTH_GROUP, post(add_group))
        .route(routes::AUTH_GROUP_REMOVE, post(remove_group))
        .with_state(svc)
}

type State = axum::extract::State<Arc<AuthService>>;

async fn public_key(axum::extract::State(svc): State) -> ApiResult<Json<PublicKeyResponse>> {
    Ok(Json(PublicKeyResponse {
        pem: svc.public_key_pem()?,
    }))
}

/// The address a request came from, when the server knows it (always, when served by
/// `cluster::serve`).
struct Source(Option<std::net::IpAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Source {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Source(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<ClientAddr>>()
                .map(|c| c.0.0.ip()),
        ))
    }
}

fn limit_source(svc: &AuthService, source: &Source) -> Result<(), AppError> {
    match source.0 {
        Some(ip) => svc.limit_addr(ip).map_err(AppError),
        None => Ok(()),
    }
}

async fn signup(
    axum::extract::State(svc): State,
    source: Source,
    admin: Result<ClusterOnly, AppError>,
    ApiJson(env): ApiJson<Envelope>,
) -> ApiResult<Json<serde_json::Value>> {
    // The administrator signing users up with the cluster key is not limited by address.
    if admin.is_err() {
        limit_source(&svc, &source)?;
    }
    if !svc.open_signup() && admin.is_err() {
        return Err(AppError(ServiceError::Forbidden(
            "signup is closed on this cluster: an administrator signs users up with the cluster key"
                .into(),
        )));
    }
    let held = svc.clone();
    let _slot = hashing_slot(&held).await?;
    let addr = source.0;
    let user = blocking(move || svc.signup_from(&env, addr)).await?;
    Ok(Json(serde_json::json!({ "user": user })))
}

async fn login(
    axum::extract::State(svc): State,
    source: Source,
    ApiJson(env): ApiJson<Envelope>,
) -> ApiResult<Json<TokenResponse>> {
    limit_source(&svc, &source)?;
    let held = svc.clone();
    let _slot = hashing_slot(&held).await?;
    let addr = source.0;
    Ok(Json(blocking(move || svc.login_from(&env, addr)).await?))
}

/// Waits for one of the password-hashing slots (one per core), so a flood of logins queues
/// instead of running hundreds of 19 MiB argon2 hashes at once.
async fn hashing_slot(svc: &AuthService) -> Result<tokio::sync::SemaphorePermit<'_>, AppError> {
    svc.hashing
        .acquire()
        .await
        .map_err(|e| AppError(ServiceError::internal("hashing slots", e)))
}

/// Every user and their identity (administrators, with the cluster key).
async fn users(
    axum::extract::State(svc): State,
    _admin: ClusterOnly,
) -> ApiResult<Json<Vec<common::api::UserInfo>>> {
    Ok(Json(blocking(move || svc.users()).await?))
}

/// Changes a user's identity (administrators, with the cluster key).
async fn set_user(
    axum::extract::State(svc): State,
    _admin: ClusterOnly,
    crate::http::ApiPath(name): crate::http::ApiPath<String>,
    ApiJson(req): ApiJson<common::api::SetUserRequest>,
) -> ApiResult<Json<common::api::UserInfo>> {
    Ok(Json(blocking(move || svc.set_user(&name, &req)).await?))
}

/// Every named group (administrators, with the cluster key).
async fn groups(
    axum::extract::State(svc): State,
    _admin: ClusterOnly,
) -> ApiResult<Json<Vec<common::api::GroupInfo>>> {
    Ok(Json(blocking(move || svc.groups()).await?))
}

/// Creates a group and/or adds members (administrators, with the cluster key).
async fn add_group(
    axum::extract::State(svc): State,
    _admin: ClusterOnly,
    crate::http::ApiPath(name): crate::http::ApiPath<String>,
    ApiJson(req): ApiJson<common::api::AddGroupRequest>,
) -> ApiResult<Json<common::api::GroupInfo>> {
    Ok(Json(blocking(move || svc.add_group(&name, &req)).await?))
}

/// Removes members, or the group (administrators, with the cluster key); answers the group
/// as it is now, `null` once removed.
async fn remove_group(
    axum::extract::State(svc): State,
    _admin: ClusterOnly,
    crate::http::ApiPath(name): crate::http::ApiPath<String>,
    ApiJson(req): ApiJson<common::api::RemoveGroupRequest>,
) -> ApiResult<Json<Option<common::api::GroupInfo>>> {
    Ok(Json(blocking(move || svc.remove_group(&name, &req)).await?))
}

async fn refresh(
    axum::extract::State(svc): State,
    ApiJson(req): ApiJson<RefreshRequest>,
) -> ApiResult<Json<TokenResponse>> {
    Ok(Json(
        blocking(move || svc.refresh(&req.refresh_token)).await?,
    ))
}
