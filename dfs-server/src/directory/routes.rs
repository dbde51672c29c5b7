//! HTTP routes of the directory service: namespace, commit, registry and cluster map.

use std::sync::Arc;

use axum::routing::{get, post};
use axum::{Json, Router};
use common::api::{
    ClusterInfo, CommitRequest, CreateRequest, ListPage, ListQuery, RegisterServerRequest,
    RegisterServerResponse, RegisterServiceRequest, RemoveQuery, RenameRequest, SetAttrRequest,
    StatFs,
};
use common::{NodeId, NodeMeta, ServerId, ValidName, routes};

use super::DirectoryService;
use crate::error::ServiceError;
use crate::http::authed::ClusterOnly;
use crate::http::{ApiJson, ApiPath, ApiQuery, ApiResult, AppError, Authed, blocking};

/// The directory router over a shared service.
pub fn router(svc: Arc<DirectoryService>) -> Router {
    Router::new()
        .route(routes::CLUSTER, get(cluster))
        .route(routes::STATFS, get(statfs))
        .route(routes::RENAME, post(rename))
        .route(routes::LINK, post(link))
        .route(routes::NODE, get(get_node).patch(setattr))
        .route(routes::CHILDREN, get(list).post(create))
        .route(routes::CHILD, get(lookup).delete(remove))
        .route(routes::REGISTER_SERVER, post(register_server))
        .route(routes::HEARTBEAT, post(heartbeat))
        .route(routes::REGISTER_SERVICE, post(register_service))
        .route(routes::COMMIT, post(commit))
        .route(routes::COMMIT_BATCH, post(commit_batch))
        .route(routes::ADD_HOLDERS_BATCH, post(add_holders))
        .route(routes::DROP_HOLDER, post(drop_holder))
        .route(routes::ADD_HOLDER, post(add_holder))
        .route(routes::INTENT, post(intent))
        .with_state(svc)
}

type State = axum::extract::State<Arc<DirectoryService>>;

fn name(s: &str) -> Result<ValidName, AppError> {
    ValidName::parse(s).map_err(|e| AppError(ServiceError::InvalidName(e)))
}

/// Cluster map: public, since a client needs it to find the auth service before logging in.
async fn cluster(axum::extract::State(svc): State) -> ApiResult<Json<ClusterInfo>> {
    let counts = svc.placement_counts();
    let (lock_url, auth_url) = svc.registry.services();
    Ok(Json(ClusterInfo {
        lock_url,
        auth_url,
        servers: svc.registry.status(&counts),
        replication: svc.replication(),
        cluster_id: svc.cluster_id(),
    }))
}

async fn statfs(axum::extract::State(svc): State, _a: Authed) -> ApiResult<Json<StatFs>> {
    Ok(Json(blocking(move || svc.statfs()).await?))
}

async fn get_node(
    axum::extract::State(svc): State,
    Authed(who): Authed,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(q): ApiQuery<common::api::NodeQuery>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    // A point read of the store takes microseconds: no hop to the blocking pool.
    let want = q
        .want()
        .map_err(|e| AppError(ServiceError::BadRequest(e)))?;
    if want == 0 {
        return Ok(Json(svc.get(NodeId(id))?).into_response());
    }
    let (meta, cap) = svc.get_to_open(NodeId(id), want, &who.caller().id)?;
    let mut resp = Json(meta).into_response();
    if let Some(cap) = cap
        && let Ok(v) = axum::http::HeaderValue::from_str(&cap)
    {
        resp.headers_mut().insert(routes::CAPABILITY_HEADER, v);
    }
    Ok(resp)
}

async fn setattr(
    axum::extract::State(svc): State,
    Authed(who): Authed,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<SetAttrRequest>,
) -> ApiResult<Json<NodeMeta>> {
    let who = who.caller().id;
    Ok(Json(
        blocking(move || svc.setattr(NodeId(id), &req, &who)).await?,
    ))
}

async fn list(
    axum::extract::State(svc): State,
    Authed(who): Authed,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<ListPage>> {
    let who = who.caller().id;
    let after = q.after.as_deref().map(name).transpose()?;
    Ok(Json(
        blocking(move || svc.list_page(NodeId(id), after.as_ref(), q.limit, &who)).await?,
    ))
}

async fn create(
    axum::extract::State(svc): State,
    Authed(who): Authed,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<CreateRequest>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    let caller = who.caller();
    let uid = caller.id.uid;
    let key_svc = svc.clone();
    let meta = blocking(move || svc.create(NodeId(id), &req, &caller)).await?;
    // The creator writes what it just made: the capability to queue for its write lock
    // comes with the answer, saving its first close a round trip.
    let cap = key_svc.write_capability(&meta, uid);
    let mut resp = Json(meta).into_response();
    if let Some(cap) = cap
        && let Ok(v) = axum::http::HeaderValue::from_str(&cap)
    {
        resp.headers_mut().insert(routes::CAPABILITY_HEADER, v);
    }
    Ok(resp)
}

async fn lookup(
    axum::extract::State(svc): State,
    Authed(who): Authed,
    ApiPath((id, n)): ApiPath<(u64, String)>,
) -> ApiResult<Json<NodeMeta>> {
    let n = name(&n)?;
    Ok(Json(svc.lookup(NodeId(id), &n, &who.caller().id)?))
}

async fn remove(
    axum::extract::State(svc): State,
    Authed(who): Authed,
    ApiPath((id, n)): ApiPath<(u64, String)>,
    ApiQuery(q): ApiQuery<RemoveQuery>,
) -> ApiResult<Json<NodeMeta>> {
    let n = name(&n)?;
    let who = who.caller().id;
    Ok(Json(
        blocking(move || svc.remove(NodeId(id), &n, q.dir, &who)).await?,
    ))
}

async fn rename(
    axum::extract::State(svc): State,
    Authed(who): Authed,
    ApiJson(req): ApiJson<RenameRequest>,
) -> ApiResult<Json<Option<NodeMeta>>> {
    let who = who.caller().id;
    Ok(Json(blocking(move || svc.rename(&req, &who)).await?))
}

async fn link(
    axum::extract::State(svc): State,
    Authed(who): Authed,
    ApiJson(req): ApiJson<common::api::LinkRequest>,
) -> ApiResult<Json<NodeMeta>> {
    let who = who.caller().id;
    Ok(Json(blocking(move || svc.link(&req, &who)).await?))
}

async fn register_server(
    axum::extract::State(svc): State,
    _c: ClusterOnly,
    ApiJson(req): ApiJson<RegisterServerRequest>,
) -> ApiResult<Json<RegisterServerResponse>> {
    let heartbeat_ms = u64::try_from(svc.heartbeat_interval().as_millis()).unwrap_or(u64::MAX);
    let cluster_id = svc.cluster_id();
    let id = blocking(move || svc.register_server(&req)).await?;
    Ok(Json(RegisterServerResponse {
        id,
        heartbeat_ms,
        cluster_id,
    }))
}

async fn heartbeat(
    axum::extract::State(svc): State,
    _c: ClusterOnly,
    ApiPath(id): ApiPath<u64>,
    ApiJson(space): ApiJson<Option<common::api::Space>>,
) -> ApiResult<Json<serde_json::Value>> {
    svc.registry.heartbeat(ServerId(id), space)?;
    Ok(Json(serde_json::json!({})))
}

async fn register_service(
    axum::extract::State(svc): State,
    _c: ClusterOnly,
    ApiJson(req): ApiJson<RegisterServiceRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    blocking(move || svc.register_service(&req)).await?;
    Ok(Json(serde_json::json!({})))
}

async fn commit(
    axum::extract::State(svc): State,
    _c: ClusterOnly,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<CommitRequest>,
) -> ApiResult<Json<common::api::CommitResponse>> {
    Ok(Json(blocking(move || svc.commit(NodeId(id), &req)).await?))
}

async fn commit_batch(
    axum::extract::State(svc): State,
    _c: ClusterOnly,
    ApiJson(req): ApiJson<common::api::CommitBatchRequest>,
) -> ApiResult<Json<common::api::BatchResponse<common::api::CommitResponse>>> {
    let results = blocking(move || svc.commit_batch(&req)).await?;
    Ok(Json(common::api::BatchResponse {
        results: results.into_iter().map(crate::error::item_result).collect(),
    }))
}

/// A client announces a write-back push.
async fn intent(
    axum::extract::State(svc): State,
    Authed(who): Authed,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<common::api::IntentRequest>,
) -> ApiResult<Json<NodeMeta>> {
    let who = who.caller().id;
    Ok(Json(
        blocking(move || svc.set_intent(NodeId(id), &req, &who)).await?,
    ))
}

/// A replica that became durable after the write was acknowledged (same body as drop-holder).
async fn add_holder(
    axum::extract::State(svc): State,
    _c: ClusterOnly,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<common::api::DropHolderRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    blocking(move || svc.add_holder(NodeId(id), &req.hash, req.server)).await?;
    Ok(Json(serde_json::json!({})))
}

async fn add_holders(
    axum::extract::State(svc): State,
    _c: ClusterOnly,
    ApiJson(req): ApiJson<common::api::AddHoldersRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    blocking(move || svc.add_holders(&req.items)).await?;
    Ok(Json(serde_json::json!({})))
}

async fn drop_holder(
    axum::extract::State(svc): State,
    _c: ClusterOnly,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<common::api::DropHolderRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    blocking(move || svc.drop_holder(NodeId(id), &req.hash, req.server)).await?;
    Ok(Json(serde_json::json!({})))
}
