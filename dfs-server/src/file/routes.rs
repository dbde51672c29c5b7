//! HTTP routes of a file server. Bodies are streamed both ways, never held whole in memory.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use common::api::{BatchResponse, FileServerStats};
use common::{ContentHash, FenceToken, NodeId, NodeMeta, ServerId, UploadId, routes};

use super::replicate::{FileServer, WriteRequest};
use crate::error::ServiceError;
use crate::http::authed::ClusterOnly;
use crate::http::{ApiPath, ApiResult, AppError, Authed};

/// The file server router.
pub fn router(fs: Arc<FileServer>) -> Router {
    Router::new()
        .route(routes::FILE_WRITE, put(write))
        .route(routes::FILE_READ, get(read))
        .route(routes::REPLICA_PUT, put(replica_put))
        .route(routes::DROP_BLOB, post(drop_blob))
        .route(routes::COPY_TO, post(copy_to))
        .route(routes::FILE_BATCH_WRITE, post(write_batch))
        .route(routes::REPLICA_BATCH, put(replica_batch))
        .route(routes::FILE_STATS, get(stats))
        .with_state(fs)
}

type State = axum::extract::State<Arc<FileServer>>;

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, AppError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| AppError(ServiceError::BadRequest(format!("missing header {name}"))))
}

fn bad(msg: &str) -> AppError {
    AppError(ServiceError::BadRequest(msg.to_owned()))
}

/// `primary,replica,...`: at most 16 server ids.
fn parse_placement(s: &str) -> Result<(ServerId, Vec<ServerId>), AppError> {
    let ids = s
        .split(',')
        .take(17)
        .map(|p| p.trim().parse::<u64>().map(ServerId))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad("placement header must be comma-separated server ids"))?;
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    if distinct.len() != ids.len() {
        return Err(bad("placement header must name distinct servers"));
    }
    match ids.split_first() {
        Some((p, rest)) if rest.len() <= 15 => Ok((*p, rest.to_vec())),
        _ => Err(bad("placement header must name 1 to 16 servers")),
    }
}

/// The most of a refused body read and dropped before answering.
const DISCARD_MAX: u64 = 1 << 30;

/// Reads and drops up to `max` bytes of `body`.
async fn discard(body: Body, max: u64) {
    let mut stream = body.into_data_stream();
    let mut seen = 0u64;
    while let Some(Ok(chunk)) = futures_util::StreamExt::next(&mut stream).await {
        seen += chunk.len() as u64;
        if seen > max {
            break;
        }
    }
}

/// The declared body length (0 if none).
fn content_length(headers: &HeaderMap) -> u64 {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The writer's client process (`x-dfs-origin`, 32 hex digits), passed on with the commit
/// so that its own push does not come back to it through the change feed (the directory binds
/// it to the writer's uid, which this server took from the writer's token).
fn origin_of(headers: &HeaderMap) -> Result<Option<String>, AppError> {
    let Some(v) = headers.get(routes::ORIGIN_HEADER) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .filter(|s| common::routes::parse_origin(s).is_some())
        .map(|s| Some(s.to_owned()))
        .ok_or_else(|| bad(&format!("{} must be 32 hex digits", routes::ORIGIN_HEADER)))
}

fn parse_hash(s: &str) -> Result<ContentHash, AppError> {
    ContentHash::parse(s).map_err(|e| AppError(ServiceError::BadRequest(e.to_string())))
}

async fn write(
    axum::extract::State(fs): State,
    Authed(who): Authed,
    ApiPath(id): ApiPath<u64>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<NodeMeta>> {
    let fence = header_str(&headers, routes::FENCE_HEADER)?
        .parse::<u64>()
        .map_err(|_| {
            AppError(ServiceError::BadRequest(
                "fence header must be a number".into(),
            ))
        })?;
    let req = WriteRequest {
        node: NodeId(id),
        hash: parse_hash(header_str(&headers, routes::HASH_HEADER)?)?,
        fence: FenceToken(fence),
        fence_sig: header_str(&headers, routes::FENCE_SIG_HEADER)?.to_owned(),
        upload_id: UploadId::parse(header_str(&headers, routes::UPLOAD_ID_HEADER)?)
            .map_err(|e| AppError(ServiceError::BadRequest(e.to_string())))?,
        base: common::api::PushBase::parse_header(header_str(&headers, routes::BASE_HEADER)?)
            .ok_or_else(|| bad("base header must be a version, optionally followed by ;waiting"))?,
        writer: who.caller(),
        origin: origin_of(&headers)?,
        placement: headers
            .get(routes::PLACEMENT_HEADER)
            .map(|v| parse_placement(v.to_str().unwrap_or("")))
            .transpose()?,
        size: headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()),
        mode: headers
            .get(routes::MODE_HEADER)
            .map(|v| {
                v.to_str()
                    .ok()
                    .and_then(|v| u32::from_str_radix(v, 8).ok())
                    .filter(|m| *m <= 0o7777)
                    .ok_or_else(|| bad("mode header must be octal permission bits"))
            })
            .transpose()?,
        mtime_ns: headers
            .get(routes::MTIME_HEADER)
            .map(|v| {
                v.to_str()
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| bad("mtime header must be nanoseconds since the epoch"))
            })
            .transpose()?,
    };
    // A write the disk cannot hold is refused without storing its body. The body is read
    // and dropped first (up to a bound): a server that answers before it has read the body
    // makes the client see a reset connection instead of the answer.
    if let Err(e) = fs.store.disk.check_room(req.size.unwrap_or(0)) {
        discard(body, DISCARD_MAX).await;
        return Err(e.into());
    }
    Ok(Json(fs.write_primary(req, body.into_data_stream()).await?))
}

/// A whole batch frame, bounded: its declared length is checked before anything is read.
async fn frame_of(headers: &HeaderMap, body: Body) -> Result<bytes::Bytes, AppError> {
    let limit = common::api::MAX_BATCH_BYTES as usize + common::batch::MAX_HEADER_BYTES + 4;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .ok_or_else(|| bad("a batch needs a content-length"))?;
    if declared > limit {
        return Err(AppError(ServiceError::TooLarge(format!(
            "a batch body is at most {limit} bytes"
        ))));
    }
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|e| bad(&format!("reading the batch body: {e}")))
}

/// A place in memory for one more batch of `kind` (0: client, 1: replica), or busy.
fn batch_permit(
    fs: &FileServer,
    kind: usize,
) -> Result<tokio::sync::SemaphorePermit<'_>, AppError> {
    fs.batch_permits[kind].try_acquire().map_err(|_| {
        AppError(ServiceError::Unavailable(
            "too many batches in flight; send the files alone or retry".into(),
        ))
    })
}

async fn write_batch(
    axum::extract::State(fs): State,
    Authed(who): Authed,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<BatchResponse<NodeMeta>>> {
    let _permit = batch_permit(&fs, 0)?;
    fs.store.disk.check_room(content_length(&headers))?;
    let frame = frame_of(&headers, body).await?;
    let results = fs
        .write_batch(&who.caller(), origin_of(&headers)?, frame)
        .await?;
    Ok(Json(BatchResponse { results }))
}

async fn replica_batch(
    axum::extract::State(fs): State,
    _c: ClusterOnly,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<BatchResponse<u64>>> {
    let _permit = batch_permit(&fs, 1)?;
    crate::faults::replica_store()?;
    fs.store.disk.check_room(content_length(&headers))?;
    let frame = frame_of(&headers, body).await?;
    let results = fs.store_replica_batch(frame).await?;
    Ok(Json(BatchResponse { results }))
}

async fn read(
    axum::extract::State(fs): State,
    Authed(who): Authed,
    ApiPath((id, hash)): ApiPath<(u64, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let hash = parse_hash(&hash)?;
    if matches!(who, crate::http::authed::Principal::User(_)) {
        // Users read only what the directory let them open (another service needs no word).
        let cap = headers
            .get(routes::CAPABILITY_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                AppError(ServiceError::AccessDenied(
                    "no capability: open the file through the directory first".into(),
                ))
            })?;
        fs.check_capability(cap, NodeId(id), &hash)?;
    }
    fs.store.stats.downloads.fetch_add(1, Ordering::Relaxed);
    if hash.as_str() == ContentHash::EMPTY_HEX {
        return Ok(([(header::CONTENT_LENGTH, "0")], Body::empty()).into_response());
    }
    let (file, len) = fs.store.open_blob(NodeId(id), &hash).await?;
    fs.store.stats.bytes_out.fetch_add(len, Ordering::Relaxed);
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20);
    Ok((
        [(header::CONTENT_LENGTH, len.to_string())],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn replica_put(
    axum::extract::State(fs): State,
    _c: ClusterOnly,
    ApiPath((id, hash)): ApiPath<(u64, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<serde_json::Value>> {
    let hash = parse_hash(&hash)?;
    crate::faults::replica_store()?;
    fs.store.disk.check_room(content_length(&headers))?;
    let size = fs
        .store
        .put_stream(NodeId(id), &hash, body.into_data_stream())
        .await?;
    fs.store
        .stats
        .replica_writes
        .fetch_add(1, Ordering::Relaxed);
    Ok(Json(serde_json::json!({ "size": size })))
}

async fn drop_blob(
    axum::extract::State(fs): State,
    _c: ClusterOnly,
    ApiPath((id, hash)): ApiPath<(u64, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    let hash = parse_hash(&hash)?;
    fs.drop_if_superseded(NodeId(id), &hash).await?;
    Ok(Json(serde_json::json!({})))
}

async fn stats(axum::extract::State(fs): State) -> Json<FileServerStats> {
    Json(fs.store.stats())
}

async fn copy_to(
    axum::extract::State(fs): State,
    _c: ClusterOnly,
    ApiPath((id, hash)): ApiPath<(u64, String)>,
    crate::http::ApiJson(req): crate::http::ApiJson<common::api::CopyToRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    let hash = parse_hash(&hash)?;
    fs.copy_to(NodeId(id), &hash, &req.url).await?;
    Ok(Json(serde_json::json!({})))
}
