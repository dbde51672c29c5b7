//! HTTP routes of the auth service: public key, signup, login, refresh.

use std::sync::Arc;

use axum::routing::{get, post};
use axum::{Json, Router};
use common::api::{Envelope, PublicKeyResponse, RefreshRequest, TokenResponse};
use common::routes;

use super::AuthService;
use crate::http::{ApiJson, ApiResult, blocking};

/// The auth router over a shared service.
pub fn router(svc: Arc<AuthService>) -> Router {
    Router::new()
        .route(routes::AUTH_PUBLIC_KEY, get(public_key))
        .route(routes::AUTH_SIGNUP, post(signup))
        .route(routes::AUTH_LOGIN, post(login))
        .route(routes::AUTH_REFRESH, post(refresh))
        .with_state(svc)
}

type State = axum::extract::State<Arc<AuthService>>;

async fn public_key(axum::extract::State(svc): State) -> ApiResult<Json<PublicKeyResponse>> {
    Ok(Json(PublicKeyResponse {
        pem: svc.public_key_pem()?,
    }))
}

async fn signup(
    axum::extract::State(svc): State,
    ApiJson(env): ApiJson<Envelope>,
) -> ApiResult<Json<serde_json::Value>> {
    let user = blocking(move || svc.signup(&env)).await?;
    Ok(Json(serde_json::json!({ "user": user })))
}

async fn login(
    axum::extract::State(svc): State,
    ApiJson(env): ApiJson<Envelope>,
) -> ApiResult<Json<TokenResponse>> {
    Ok(Json(blocking(move || svc.login(&env)).await?))
}

async fn refresh(
    axum::extract::State(svc): State,
    ApiJson(req): ApiJson<RefreshRequest>,
) -> ApiResult<Json<TokenResponse>> {
    Ok(Json(
        blocking(move || svc.refresh(&req.refresh_token)).await?,
    ))
}
