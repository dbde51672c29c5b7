//! HTTP routes of the directory service: namespace, commit, registry and cluster map.

use std::sync::Arc;

use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use common::api::{
    ChangesQuery, ChangesResponse, ClusterInfo, CommitRequest, CreateRequest, ListPage, ListQuery,
    RegisterServerRequest, RegisterServerResponse, RegisterServiceRequest, RemoveQuery,
    RenameRequest, SetAttrRequest, StatFs,
};
use common::{NodeId, NodeMeta, ServerId, ValidName, routes};

use super::feed::{Feed, with_origin};
use super::{DirectoryService, RequestId};
use crate::error::ServiceError;
use crate::http::authed::ClusterOnly;
use crate::http::{ApiJson, ApiPath, ApiQuery, ApiResult, AppError, Authed, blocking};

/// The directory router over a shared service. Its change feed is the service's (the store
/// publishes every committed change to it); the caller closes it when the service stops
/// (`Feed::close_when`), so that no long poll holds the shutdown.
pub fn router(svc: Arc<DirectoryService>) -> Router {
    router_inner(svc)
}

/// [`router`], its feed closed when `cancel` fires (call within a runtime).
pub fn router_until(
    svc: Arc<DirectoryService>,
    cancel: tokio_util::sync::CancellationToken,
) -> Router {
    svc.feed().close_when(cancel);
    router_inner(svc)
}

fn router_inner(svc: Arc<DirectoryService>) -> Router {
    let feed = svc.feed().clone();
    Router::new()
        .route(routes::CHANGES, get(changes))
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
        .layer(Extension(feed))
        .with_state(svc)
}

/// The feed the long poll reads.
type Changes = Extension<Arc<Feed>>;

/// The client a request comes from (`x-dfs-origin`: 32 hex digits, random per client
/// process), if it names one: its feed polls leave out the changes it made itself.
struct Origin(Option<u128>);

/// The origin of the changes a request of `uid` makes (filtered from that client's polls).
fn stamp(origin: Option<u128>, uid: u32) -> super::feed::Origin {
    origin.map(|o| (o, uid))
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Origin {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        let Some(v) = parts.headers.get(routes::ORIGIN_HEADER) else {
            return Ok(Origin(None));
        };
        v.to_str()
            .ok()
            .and_then(routes::parse_origin)
            .map(|o| Origin(Some(o)))
            .ok_or_else(|| {
                AppError(ServiceError::BadRequest(format!(
                    "{} must be 32 hex digits",
                    routes::ORIGIN_HEADER
                )))
            })
    }
}

type State = axum::extract::State<Arc<DirectoryService>>;

fn name(s: &str) -> Result<ValidName, AppError> {
    ValidName::parse(s).map_err(|e| AppError(ServiceError::InvalidName(e)))
}

/// The request id of a namespace change, if the client sent one (`x-dfs-request-id`).
fn request_id(headers: &axum::http::HeaderMap) -> Result<Option<RequestId>, AppError> {
    let Some(v) = headers.get(routes::REQUEST_ID) else {
        return Ok(None);
    };
    let s = v.to_str().map_err(|_| {
        AppError(ServiceError::BadRequest(format!(
            "{} must be 1 to {} characters of [A-Za-z0-9-]",
            routes::REQUEST_ID,
            super::requests::MAX_LEN
        )))
    })?;
    Ok(Some(RequestId::parse(s)?))
}

/// Cluster map: public, since a client needs it to find the auth service before logging in.
async fn cluster(axum::extract::State(svc): State) -> ApiResult<Json<ClusterInfo>> {
    let counts = svc.placement_counts();
    let (mut lock_url, mut auth_url) = svc.registry.services();
    let mut lock_urls = svc.registry.lock_urls();
    if lock_url.is_none() || auth_url.is_none() || lock_urls.is_empty() {
        // Another instance on the shared store may know them already (they registered
        // there); this one would learn them only at its next registry sync. Only a map with
        // a service missing costs this read.
        let s = svc.clone();
        blocking(move || s.sync_registry()).await?;
        (lock_url, auth_url) = svc.registry.services();
        lock_urls = svc.registry.lock_urls();
    }
    Ok(Json(ClusterInfo {
        lock_url,
        lock_urls,
        auth_url,
        servers: svc.registry.status(&counts),
        replication: svc.replication(),
        cluster_id: svc.cluster_id(),
    }))
}

/// The change feed: a long poll open to every logged-in user (it names node ids only).
async fn changes(
    Extension(feed): Changes,
    Authed(who): Authed,
    Origin(me): Origin,
    ApiQuery(q): ApiQuery<ChangesQuery>,
) -> ApiResult<Json<ChangesResponse>> {
    if q.wait_ms > common::api::CHANGES_MAX_WAIT_MS {
        return Err(AppError(ServiceError::BadRequest(format!(
            "wait_ms is at most {}",
            common::api::CHANGES_MAX_WAIT_MS
        ))));
    }
    let wait = std::time::Duration::from_millis(q.wait_ms);
    // A feed whose source went silent (this instance cut off from etcd's quorum) cannot tell
    // "nothing changed" from "nothing heard": the client must not keep long TTLs on it.
    let stalled = || {
        AppError(ServiceError::Unavailable(
            "this directory instance's change feed has not heard from its store lately; \
             poll again or another instance"
                .into(),
        ))
    };
    if !feed.healthy() {
        return Err(stalled());
    }
    let r = feed
        .wait(
            q.epoch,
            q.after,
            common::api::CHANGES_MAX_PER_ANSWER,
            stamp(me, who.caller().id.uid),
            wait,
        )
        .await;
    if !feed.healthy() {
        return Err(stalled());
    }
    Ok(Json(r))
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
    Origin(origin): Origin,
    Authed(who): Authed,
    ApiPath(id): ApiPath<u64>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<SetAttrRequest>,
) -> ApiResult<Json<NodeMeta>> {
    let who = who.caller().id;
    let rid = request_id(&headers)?;
    let o = stamp(origin, who.uid);
    let meta = blocking(move || {
        with_origin(o, || {
            svc.setattr_with_id(NodeId(id), &req, &who, rid.as_ref())
        })
    })
    .await?;
    Ok(Json(meta))
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
    Origin(origin): Origin,
    Authed(who): Authed,
    ApiPath(id): ApiPath<u64>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<CreateRequest>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    let caller = who.caller();
    let uid = caller.id.uid;
    let key_svc = svc.clone();
    let rid = request_id(&headers)?;
    let o = stamp(origin, uid);
    let meta = blocking(move || {
        with_origin(o, || {
            svc.create_with_id(NodeId(id), &req, &caller, rid.as_ref())
        })
    })
    .await?;
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
    Origin(origin): Origin,
    Authed(who): Authed,
    ApiPath((id, n)): ApiPath<(u64, String)>,
    ApiQuery(q): ApiQuery<RemoveQuery>,
    headers: axum::http::HeaderMap,
) -> ApiResult<Json<NodeMeta>> {
    let n = name(&n)?;
    let who = who.caller().id;
    let rid = request_id(&headers)?;
    let o = stamp(origin, who.uid);
    let meta = blocking(move || {
        with_origin(o, || {
            svc.remove_with_id(NodeId(id), &n, q.dir, &who, rid.as_ref())
        })
    })
    .await?;
    Ok(Json(meta))
}

async fn rename(
    axum::extract::State(svc): State,
    Origin(origin): Origin,
    Authed(who): Authed,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<RenameRequest>,
) -> ApiResult<Json<Option<NodeMeta>>> {
    let who = who.caller().id;
    let rid = request_id(&headers)?;
    let o = stamp(origin, who.uid);
    // The moved node and the one replaced are recorded by the rename's own transaction.
    let replaced =
        blocking(move || with_origin(o, || svc.rename_with_id(&req, &who, rid.as_ref()))).await?;
    Ok(Json(replaced))
}

async fn link(
    axum::extract::State(svc): State,
    Origin(origin): Origin,
    Authed(who): Authed,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<common::api::LinkRequest>,
) -> ApiResult<Json<NodeMeta>> {
    let who = who.caller().id;
    let rid = request_id(&headers)?;
    let o = stamp(origin, who.uid);
    let meta =
        blocking(move || with_origin(o, || svc.link_with_id(&req, &who, rid.as_ref()))).await?;
    Ok(Json(meta))
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
    if svc.registry.url(ServerId(id)).is_none() {
        // Registered through another instance, maybe: learn of it before refusing it.
        let s = svc.clone();
        blocking(move || s.sync_registry()).await?;
    }
    blocking(move || svc.heartbeat(ServerId(id), space)).await?;
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

/// The origin of a primary's commit: the writer's client process, as the primary heard it
/// from the writer's push, bound to the writer's uid (which the primary took from the
/// writer's token), as a namespace op's origin is bound to its caller's.
fn commit_origin(req: &CommitRequest) -> Result<super::feed::Origin, AppError> {
    let Some(o) = &req.origin else {
        return Ok(None);
    };
    let o = routes::parse_origin(o).ok_or_else(|| {
        AppError(ServiceError::BadRequest(
            "a commit's origin must be 32 hex digits".into(),
        ))
    })?;
    Ok(req.writer_id.as_ref().map(|w| (o, w.uid)))
}

async fn commit(
    axum::extract::State(svc): State,
    _c: ClusterOnly,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<CommitRequest>,
) -> ApiResult<Json<common::api::CommitResponse>> {
    let o = commit_origin(&req)?;
    let r = blocking(move || with_origin(o, || svc.commit(NodeId(id), &req))).await?;
    Ok(Json(r))
}

async fn commit_batch(
    axum::extract::State(svc): State,
    _c: ClusterOnly,
    ApiJson(req): ApiJson<common::api::CommitBatchRequest>,
) -> ApiResult<Json<common::api::BatchResponse<common::api::CommitResponse>>> {
    // One origin for the transaction: the batch's items all come from one push.
    let mut origins = req.items.iter().map(|i| commit_origin(&i.commit));
    let o = match origins.next().transpose()? {
        Some(first) if origins.all(|o| o.is_ok_and(|o| o == first)) => first,
        _ => None,
    };
    let results = blocking(move || with_origin(o, || svc.commit_batch(&req))).await?;
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::directory::DirectoryConfig;
    use crate::http::authed::Verifier;
    use crate::tls::ClientTls;

    /// A feed whose source went silent answers `unavailable` (the client drops to short
    /// TTLs), a poll waiting as it stalls included; heard from again, it answers.
    #[tokio::test]
    async fn a_stalled_feed_answers_unavailable_and_ends_a_waiting_poll() {
        let dir = tempfile::tempdir().expect("tempdir");
        let svc =
            Arc::new(DirectoryService::open(dir.path(), DirectoryConfig::default()).expect("open"));
        let verifier = Verifier::new("k", None, None, &ClientTls::system()).expect("verifier");
        let app = router(svc.clone()).layer(Extension(Arc::new(verifier)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let http = ClientTls::system()
            .builder()
            .expect("builder")
            .build()
            .expect("client");
        let poll = |epoch: Option<u64>, wait_ms: u64| {
            let mut url = format!("http://{addr}{}?after=0&wait_ms={wait_ms}", routes::CHANGES);
            if let Some(e) = epoch {
                url.push_str(&format!("&epoch={e}"));
            }
            http.get(url).header(routes::CLUSTER_KEY_HEADER, "k").send()
        };
        let first = poll(None, 0).await.expect("poll");
        assert_eq!(first.status(), 200);
        let first: ChangesResponse = first.json().await.expect("json");
        assert!(first.resync);
        // Watched from now on, and never heard from: it stalls after 500 ms.
        svc.feed().watched(Duration::from_millis(500));
        let began = Instant::now();
        let waited = poll(Some(first.epoch), 10_000).await.expect("poll");
        assert_eq!(waited.status(), 503, "a waiting poll outlived the stall");
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "{:?}",
            began.elapsed()
        );
        assert_eq!(
            poll(Some(first.epoch), 0).await.expect("poll").status(),
            503
        );
        svc.feed().confirm();
        assert_eq!(
            poll(Some(first.epoch), 0).await.expect("poll").status(),
            200
        );
    }
}
