//! Listening sockets of every service: plain TCP, or TLS with handshakes run off the accept loop
//! (a slow or silent client cannot hold up others), and the client address each request carries
//! (`ClientAddr`, for the per-address login limits).

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;

use crate::tls::{PLAIN_HTTP_ON_TLS, ServerTls};

/// The address a request came from (`ConnectInfo<ClientAddr>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// How long a TLS handshake may take, first byte included.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Most handshakes in progress at once from one source (IPv6: one /64); past it new
/// connections from there are closed at once, so one source cannot take every slot.
const MAX_HANDSHAKES_PER_SOURCE: usize = 32;
/// Handshakes finished but not yet taken by the server.
const READY_QUEUE: usize = 64;
/// Most handshakes in progress at once; past it the accept loop waits (the kernel's backlog
/// holds new connections meanwhile).
const MAX_HANDSHAKES: usize = 1024;

/// A bound service socket.
pub struct DfsListener {
    local: SocketAddr,
    inner: Inner,
}

enum Inner {
    Plain(TcpListener),
    Tls {
        ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
        accepting: tokio::task::JoinHandle<()>,
    },
}

impl Drop for DfsListener {
    fn drop(&mut self) {
        if let Inner::Tls { accepting, .. } = &self.inner {
            accepting.abort();
        }
    }
}

impl DfsListener {
    /// Wraps `listener`, serving TLS with `tls` when given.
    pub fn new(listener: TcpListener, tls: Option<&ServerTls>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let inner = match tls {
            None => Inner::Plain(listener),
            Some(tls) => {
                let (tx, ready) = tokio::sync::mpsc::channel(READY_QUEUE);
                let accepting = tokio::spawn(accept_tls(listener, tls.acceptor(), tx));
                Inner::Tls { ready, accepting }
            }
        };
        Ok(DfsListener { local, inner })
    }

    /// Whether connections are TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.inner, Inner::Tls { .. })
    }

    /// The URL clients reach it at (`https://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.is_tls() { "https" } else { "http" };
        format!("{scheme}://{}", self.local)
    }
}

async fn accept_error(e: std::io::Error) {
    tracing::warn!(error = %e, "accepting a connection");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

async fn accept_tls(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    ready: tokio::sync::mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let per_source = PerSource::new(MAX_HANDSHAKES_PER_SOURCE);
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                accept_error(e).await;
                continue;
            }
        };
        let Some(source_slot) = per_source.enter(addr.ip()) else {
            tracing::debug!(%addr, "too many TLS handshakes from this source; closed");
            continue;
        };
        let acceptor = acceptor.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _source_slot = source_slot;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(tcp, acceptor)).await {
                Ok(Ok(Some(tls))) => {
                    let _ = ready.send((tls, addr)).await;
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
            }
        });
    }
}

/// Handshakes in progress per source address (IPv6 by /64, as the login limits).
#[derive(Clone)]
struct PerSource {
    max: usize,
    counts: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

/// One handshake's place in its source's count, given back when dropped.
struct SourceSlot {
    ip: std::net::IpAddr,
    of: PerSource,
}

impl PerSource {
    fn new(max: usize) -> Self {
        PerSource {
            max,
            counts: Default::default(),
        }
    }

    /// A place for one more handshake from `ip`, or None when it has `max` already.
    fn enter(&self, ip: std::net::IpAddr) -> Option<SourceSlot> {
        let ip = crate::auth::limit::addr_key(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            ip,
            of: self.clone(),
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut counts = self.of.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Completes the handshake, or answers a plain HTTP request with a plain 400 saying to use
/// https (None), as a client that forgot the scheme deserves a clear word, not a reset.
async fn handshake(
    mut tcp: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
) -> std::io::Result<Option<TlsStream<TcpStream>>> {
    let mut first = [0u8; 1];
    if tcp.peek(&mut first).await? == 0 {
        return Ok(None);
    }
    // 0x16: a TLS handshake record.
    if first[0] != 0x16 {
        let body = serde_json::to_string(&common::ErrorBody {
            code: common::ErrorCode::BadRequest,
            message: PLAIN_HTTP_ON_TLS.to_owned(),
        })
        .unwrap_or_default();
        let resp = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        tcp.write_all(resp.as_bytes()).await?;
        tcp.shutdown().await?;
        return Ok(None);
    }
    let tls = acceptor.accept(tcp).await?;
    // Small answers must not wait for Nagle behind TLS records.
    tls.get_ref().0.set_nodelay(true)?;
    Ok(Some(tls))
}

impl axum::serve::Listener for DfsListener {
    type Io = Either<TcpStream, TlsStream<TcpStream>>;
    type Addr = ClientAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match &mut self.inner {
            Inner::Plain(l) => loop {
                match TcpListener::accept(l).await {
                    Ok((s, a)) => return (Either::Left(s), ClientAddr(a)),
                    Err(e) => accept_error(e).await,
                }
            },
            Inner::Tls { ready, .. } => match ready.recv().await {
                Some((s, a)) => (Either::Right(s), ClientAddr(a)),
                // The accept loop ended (it never does while the listener lives).
                None => std::future::pending().await,
            },
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(ClientAddr(self.local))
    }
}

impl Connected<IncomingStream<'_, DfsListener>> for ClientAddr {
    fn connect_info(stream: IncomingStream<'_, DfsListener>) -> Self {
        *stream.remote_addr()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn handshakes_per_source_are_capped_and_given_back() {
        let per = PerSource::new(MAX_HANDSHAKES_PER_SOURCE);
        let a: std::net::IpAddr = [127, 0, 0, 1].into();
        let held: Vec<SourceSlot> = (0..MAX_HANDSHAKES_PER_SOURCE)
            .map(|_| per.enter(a).unwrap())
            .collect();
        assert!(per.enter(a).is_none(), "the 33rd is refused");
        assert!(
            per.enter([127, 0, 0, 2].into()).is_some(),
            "another source is apart"
        );
        // One /64 is one source.
        let v6 = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let six: Vec<SourceSlot> = (0..MAX_HANDSHAKES_PER_SOURCE)
            .map(|i| per.enter(v6(&format!("2001:db8::{:x}", i + 1))).unwrap())
            .collect();
        assert!(per.enter(v6("2001:db8::ffff")).is_none());
        drop(held);
        drop(six);
        assert!(per.enter(a).is_some(), "places come back");
        assert!(per.counts.lock().unwrap().len() <= 1);
    }

    #[tokio::test]
    async fn a_connection_that_never_starts_a_handshake_is_closed_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        let tls = ServerTls::load(&c, &k).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listener = DfsListener::new(tcp, Some(&tls)).unwrap();
        let started = std::time::Instant::now();
        let mut idle = TcpStream::connect(listener.local).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
            .await
            .expect("closed within the timeout")
            .unwrap_or(0);
        assert_eq!(n, 0, "closed without a byte");
        let took = started.elapsed();
        assert!(
            took >= HANDSHAKE_TIMEOUT - Duration::from_millis(100) && took < Duration::from_secs(8),
            "{took:?}"
        );
    }
}
