//! Serving HTTP with limits: a connection cap in total and per client address, a deadline for
//! a request's headers (counted from when the server waits for them: a new connection, or a
//! kept-alive one between requests), and a graceful stop that does not wait forever for
//! streams (`/api/events`) to end.
//!
//! axum's own `serve` has none of these: 1,100 silent connections held the process at its
//! file-descriptor limit and the API and UI answered nobody until they closed.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// The limits of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections at once.
    pub connections: usize,
    /// Connections from one client address at once.
    pub connections_per_address: usize,
    /// How long a connection may take to send a request's headers.
    pub header_timeout: Duration,
}

/// How long a stop waits for requests in flight before it closes their connections.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` within `limits` until `stop` completes. A connection beyond a
/// cap is closed as soon as it is accepted (its client sees a reset at once instead of a
/// hang); each request carries its client's address (`ConnectInfo<SocketAddr>`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    stop: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let total = Arc::new(Semaphore::new(limits.connections));
    let per_address = Arc::new(Mutex::new(HashMap::<IpAddr, usize>::new()));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let mut stop = std::pin::pin!(stop);
    let mut refused: u64 = 0;
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors or a connection reset before accept: wait a moment
                    // rather than spin.
                    tracing::warn!(%err, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let Ok(permit) = Arc::clone(&total).try_acquire_owned() else {
            refused += 1;
            log_refusal(refused, remote, "the server holds its limit of HTTP connections");
            continue;
        };
        let Some(slot) = AddressSlot::take(&per_address, remote.ip(), limits.connections_per_address) else {
            refused += 1;
            log_refusal(refused, remote, "that address holds its limit of HTTP connections");
            continue;
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo(remote));
            app.clone().oneshot(request)
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = connection.await;
            drop(slot);
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(STOP_GRACE, graceful.shutdown()).await.is_err() {
        tracing::info!("HTTP connections still open after {} s (event streams): closing them", STOP_GRACE.as_secs());
    }
    Ok(())
}

/// Logs a refused connection: the first, then every thousandth (anyone can cause them).
fn log_refusal(refused: u64, remote: SocketAddr, why: &str) {
    if refused == 1 || refused % 1000 == 0 {
        tracing::warn!(%remote, refused, "HTTP connection refused: {why}");
    }
}

/// One of an address's connection slots; given back when dropped.
struct AddressSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl AddressSlot {
    fn take(counts: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr, limit: usize) -> Option<Self> {
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = map.entry(ip).or_default();
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(Self { counts: Arc::clone(counts), ip })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = map.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.ip);
            }
        }
    }
}
