//! The stores behind their interfaces: one suite, run against every backend there is.
//! SQLite (files in a temporary directory) always.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{client_context, server_context};
use tether::store::{
    RegistrationStore, RegistrationWrite, SessionStore, SessionWrite, SqliteRegistrations, SqliteSessions,
};
use tether_coap::registration::{Binding, Lifetime, Links, Registration};
use tether_proto::dtls::{Endpoint, EndpointConfig, EndpointEvent, Session, SessionHandle, SessionSnapshot};

fn dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tether-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn registration(endpoint: &str, id: &str, now: Instant) -> Registration {
    Registration {
        id: id.into(),
        endpoint: endpoint.into(),
        identity: "psk:identity".into(),
        session: Some(SessionHandle(7)),
        peer: "127.0.0.1:5000".parse().unwrap(),
        lifetime: Lifetime::from_secs(300).unwrap(),
        version: "1.1".into(),
        binding: Binding::Udp,
        links: Links::parse("</>;ct=11543,</3/0>").unwrap(),
        content_format: Some(11543),
        registered_at: now - Duration::from_secs(60),
        last_update: now - Duration::from_secs(10),
    }
}

/// An established server session's snapshot (a real handshake, in memory).
fn snapshot() -> SessionSnapshot {
    let now = Instant::now();
    let config = EndpointConfig::new([3; 32]).sequence_reservation(1000);
    let mut endpoint = Endpoint::new(server_context(), config, now).unwrap();
    let mut client = Session::client(&client_context(), now).unwrap();
    let at: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    for _ in 0..20 {
        while let Some(datagram) = client.poll_transmit() {
            endpoint.handle(now, at, &datagram.contents);
        }
        while let Some(datagram) = endpoint.poll_transmit() {
            client.handle_datagram(now, &datagram.contents);
        }
    }
    let handle = std::iter::from_fn(|| endpoint.poll_event())
        .find_map(|e| match e {
            EndpointEvent::Connected { handle, .. } => Some(handle),
            _ => None,
        })
        .expect("the handshake completes");
    endpoint.snapshot(handle).unwrap()
}

async fn registrations_round_trip_and_removal_keeps_newer_ones(store: &dyn RegistrationStore) {
    let now = Instant::now();
    let saved = registration("urn:dev:1", "abc", now);
    let other = registration("urn:dev:2", "def", now);
    let writes = vec![RegistrationWrite::Save(Box::new(saved.clone())), RegistrationWrite::Save(Box::new(other))];
    store.apply(writes, now).await.unwrap();
    let mut loaded = store.load(now).await.unwrap();
    loaded.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
    assert_eq!(loaded.len(), 2);
    let got = &loaded[0];
    assert_eq!(
        (&got.id, &got.endpoint, got.session, got.peer, got.lifetime, got.content_format),
        (&saved.id, &saved.endpoint, Some(SessionHandle(7)), saved.peer, saved.lifetime, Some(11543))
    );
    assert_eq!(got.links, saved.links);
    let drift = got.last_update.max(saved.last_update) - got.last_update.min(saved.last_update);
    assert!(drift < Duration::from_millis(50), "times survive within the clock's resolution: {drift:?}");
    let stale = RegistrationWrite::Remove { endpoint: "urn:dev:1".into(), id: "older-id".into() };
    store.apply(vec![stale], now).await.unwrap();
    assert_eq!(store.load(now).await.unwrap().len(), 2, "a stale removal keeps the newer registration");
    let remove = |endpoint: &str, id: &str| RegistrationWrite::Remove { endpoint: endpoint.into(), id: id.into() };
    store.apply(vec![remove("urn:dev:1", "abc"), remove("urn:dev:2", "def")], now).await.unwrap();
    assert!(store.load(now).await.unwrap().is_empty());
}

async fn sessions_are_stored_checkpointed_and_deleted(store: &dyn SessionStore) {
    let snapshot = snapshot();
    let limit = snapshot.write_limit();
    let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let insert = |handle| SessionWrite::Insert { handle, peer, snapshot: Box::new(snapshot.clone()) };
    store.apply(vec![insert(SessionHandle(1)), insert(SessionHandle(2))]).await.unwrap();
    assert_eq!(store.count().await.unwrap(), 2);
    let moved: SocketAddr = "127.0.0.1:6000".parse().unwrap();
    let checkpoint = tether_proto::dtls::Checkpoint {
        handle: SessionHandle(1),
        peer: moved,
        write_limit: limit + 5000,
        replay_window: (10, 0b11),
    };
    store.apply(vec![SessionWrite::Checkpoint(checkpoint), SessionWrite::Delete(SessionHandle(2))]).await.unwrap();
    let loaded = store.load().await.unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!((loaded[0].handle, loaded[0].peer), (SessionHandle(1), moved));
    assert_eq!(loaded[0].snapshot.write_limit(), limit + 5000, "the reservation stored is where it restarts");
    // A checkpoint never moves a reservation down.
    let older = tether_proto::dtls::Checkpoint { write_limit: limit + 10, ..checkpoint };
    store.apply(vec![SessionWrite::Checkpoint(older)]).await.unwrap();
    assert_eq!(store.load().await.unwrap()[0].snapshot.write_limit(), limit + 5000);
    store.apply(vec![SessionWrite::Delete(SessionHandle(1))]).await.unwrap();
    assert_eq!(store.count().await.unwrap(), 0);
}

#[tokio::test]
async fn sqlite_registrations() {
    let dir = dir("registrations");
    let store = SqliteRegistrations::open(&dir.join("registrations.db")).unwrap();
    registrations_round_trip_and_removal_keeps_newer_ones(&store).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn sqlite_sessions() {
    let dir = dir("sessions");
    let store = SqliteSessions::open(&dir.join("sessions.db")).unwrap();
    sessions_are_stored_checkpointed_and_deleted(&store).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn an_sqlite_session_store_put_back_from_an_older_copy_is_detected() {
    let dir = dir("rollback");
    let path = dir.join("sessions.db");
    let store = SqliteSessions::open(&path).unwrap();
    assert_eq!(store.opened().rolled_back, None);
    store.apply(vec![SessionWrite::Delete(SessionHandle(1))]).await.unwrap();
    drop(store); // a clean close folds the write-ahead log into the file
    std::fs::copy(&path, dir.join("copy.db")).unwrap();

    let store = SqliteSessions::open(&path).unwrap();
    assert_eq!(store.opened().rolled_back, None, "reopened as it was left");
    store.apply(vec![SessionWrite::Delete(SessionHandle(2))]).await.unwrap();
    drop(store);
    std::fs::copy(dir.join("copy.db"), &path).unwrap();
    let store = SqliteSessions::open(&path).unwrap();
    let rolled_back = store.opened().rolled_back.expect("the copy is older than the marker");
    assert!(rolled_back.database < rolled_back.marker, "{rolled_back:?}");
    store.apply(vec![SessionWrite::Delete(SessionHandle(1))]).await.unwrap();
    drop(store);
    let store = SqliteSessions::open(&path).unwrap();
    assert_eq!(store.opened().rolled_back, None, "the store goes on from there");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_damaged_sqlite_file_is_refused_and_a_killed_one_is_named() {
    let dir = dir("damaged");
    let path = dir.join("sessions.db");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    let err = SqliteSessions::open(&path).unwrap_err().to_string();
    assert!(err.contains("is damaged") && err.contains("move it away"), "{err}");
    std::fs::remove_file(&path).unwrap();
    let store = Arc::new(SqliteSessions::open(&path).unwrap());
    std::fs::copy(&path, dir.join("live.db")).unwrap();
    let mut wal = path.clone().into_os_string();
    wal.push("-wal");
    std::fs::copy(&wal, dir.join("live.db-wal")).unwrap(); // as a kill leaves it
    drop(store);
    assert!(SqliteSessions::open(&dir.join("live.db")).unwrap().opened().store.unclean);
    let registrations = dir.join("registrations.db");
    std::fs::write(&registrations, b"not a database at all, not even close").unwrap();
    let err = SqliteRegistrations::open(&registrations).unwrap_err().to_string();
    assert!(err.contains("is damaged") && err.contains("restore it from a backup"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
