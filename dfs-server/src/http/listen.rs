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

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
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
        let acceptor = acceptor.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let _slot = slot;
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
