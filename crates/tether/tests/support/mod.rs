//! Contexts and servers for the tokio tests.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether::{DtlsServer, DtlsServerConfig, MemoryNetwork};
use tether_proto::dtls::{
    ClientConfig, DtlsContext, EndpointConfig, PskKey, ServerConfig, SessionConfig, StaticPskStore,
};
use tether_proto::pool::PoolConfig;

pub const IDENTITY: &str = "identity";

pub fn key() -> PskKey {
    PskKey::from_hex("73656372657450534b").unwrap()
}

pub fn session() -> SessionConfig {
    SessionConfig::default()
        .retransmit(Duration::from_millis(20), Duration::from_millis(200))
        .handshake_timeout(Duration::from_secs(10))
}

pub fn server_context() -> Arc<DtlsContext> {
    let store = StaticPskStore::new().with(IDENTITY, key());
    DtlsContext::server(ServerConfig::psk(store).session(session())).unwrap()
}

pub fn client_context() -> Arc<DtlsContext> {
    DtlsContext::client(ClientConfig::psk(IDENTITY, key()).session(session())).unwrap()
}

/// A server whose clients all share one identity and one address (these tests are about
/// pooling, echoing and load, not the admission policy: `limits.rs` tests that).
pub fn server_config(pool: PoolConfig) -> DtlsServerConfig {
    let endpoint =
        EndpointConfig::new([5; 32]).max_sessions_per_identity(100_000).handshakes_per_source(100_000, 100_000);
    DtlsServerConfig::default().endpoint(endpoint).pool(pool)
}

pub fn addr(last: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, last], port))
}

/// A PSK server on the memory network at `at`, echoing whatever it receives.
pub fn echo_server(net: &MemoryNetwork, at: SocketAddr, pool: PoolConfig) -> Arc<DtlsServer> {
    let socket = net.bind(at).unwrap();
    let server = Arc::new(DtlsServer::serve(socket, server_context(), server_config(pool)).unwrap());
    let echo = Arc::clone(&server);
    tokio::spawn(async move {
        while let Some((peer, data)) = echo.recv().await {
            let _ = echo.send_to(peer, &data).await;
        }
    });
    server
}
