//! The stores behind their interfaces: one suite, run against every backend there is.
//! SQLite (files in a temporary directory) always; PostgreSQL on the server that
//! `TETHER_TEST_POSTGRES` names (a database of its own per test; required in CI).

#[path = "support/postgres.rs"]
mod postgres;
mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::TestDatabase;
use support::{client_context, server_context};
use tether::store::{
    Membership, NodeAddresses, PostgresStore, RegistrationStore, RegistrationWrite, SessionStore, SessionWrite, Share,
    SqliteRegistrations, SqliteSessions,
};
use tether_coap::registration::{Binding, Lifetime, Links, Registration};
use tether_proto::dtls::{
    ClientConfig, DtlsContext, Endpoint, EndpointConfig, EndpointEvent, NodeId, Session, SessionHandle, SessionSnapshot,
};

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
    snapshot_of(&client_context())
}

/// The snapshot of a session of a client that asks for a Connection ID.
fn snapshot_with_cid() -> SessionSnapshot {
    let config = ClientConfig::psk(support::IDENTITY, support::key()).session(support::session());
    snapshot_of(&DtlsContext::client(config.connection_id(Vec::new())).unwrap())
}

fn snapshot_of(client: &Arc<DtlsContext>) -> SessionSnapshot {
    let now = Instant::now();
    let config = EndpointConfig::new([3; 32]).sequence_reservation(1000);
    let mut endpoint = Endpoint::new(server_context(), config, now).unwrap();
    let mut client = Session::client(client, now).unwrap();
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
async fn every_open_of_a_session_store_is_a_new_start_of_its_node() {
    let dir = dir("boots");
    let path = dir.join("sessions.db");
    let boots: Vec<_> = (0..3).map(|_| SqliteSessions::open(&path).unwrap().opened().handles).collect();
    assert!(boots.iter().all(|h| h.node == NodeId(0)));
    assert!(boots[0].boot < boots[1].boot && boots[1].boot < boots[2].boot, "{boots:?}");
    let _ = std::fs::remove_dir_all(&dir);

    let Some(db) = TestDatabase::create("boots").await else { return };
    let mut seen = Vec::new();
    for node in [5, 5, 6] {
        let store = PostgresStore::connect(&db.url, NodeId(node), None).await.unwrap();
        seen.push(SessionStore::opened(&store).handles);
    }
    assert_eq!(seen.iter().map(|h| h.node).collect::<Vec<_>>(), [NodeId(5), NodeId(5), NodeId(6)]);
    assert!(seen[0].boot < seen[1].boot, "{seen:?}");
    db.drop_database().await;
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

#[tokio::test]
async fn postgres_registrations() {
    let Some(db) = TestDatabase::create("registrations").await else { return };
    let store = PostgresStore::connect(&db.url, NodeId(0), None).await.unwrap();
    registrations_round_trip_and_removal_keeps_newer_ones(&store).await;
    // A registration ID moves with its endpoint: a stale row holding it gives way.
    let now = Instant::now();
    let store: &dyn RegistrationStore = &store;
    store.apply(vec![RegistrationWrite::Save(Box::new(registration("urn:dev:1", "same", now)))], now).await.unwrap();
    store.apply(vec![RegistrationWrite::Save(Box::new(registration("urn:dev:2", "same", now)))], now).await.unwrap();
    let loaded = store.load(now).await.unwrap();
    assert_eq!(loaded.iter().map(|r| r.endpoint.as_str()).collect::<Vec<_>>(), ["urn:dev:2"]);
    db.drop_database().await;
}

#[tokio::test]
async fn postgres_sessions() {
    let Some(db) = TestDatabase::create("sessions").await else { return };
    let store = PostgresStore::connect(&db.url, NodeId(0), None).await.unwrap();
    sessions_are_stored_checkpointed_and_deleted(&store).await;
    drop(store);
    db.drop_database().await;
}

/// Nodes share the database, never each other's sessions: a node loads, checkpoints and
/// deletes its own only, an insert never takes another node's row, and one node id is held
/// by one server at a time.
#[tokio::test]
async fn postgres_nodes_keep_to_their_own_sessions() {
    let Some(db) = TestDatabase::create("nodes").await else { return };
    let (one, two) = tokio::join!(
        PostgresStore::connect(&db.url, NodeId(1), None),
        PostgresStore::connect(&db.url, NodeId(2), None)
    );
    let (one, two) = (one.unwrap(), two.unwrap());
    let snapshot = snapshot();
    let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let insert = |handle| SessionWrite::Insert { handle, peer, snapshot: Box::new(snapshot.clone()) };
    SessionStore::apply(&one, vec![insert(SessionHandle(1))]).await.unwrap();
    SessionStore::apply(&two, vec![insert(SessionHandle(2))]).await.unwrap();
    assert_eq!(
        SessionStore::load(&one).await.unwrap().iter().map(|s| s.handle).collect::<Vec<_>>(),
        [SessionHandle(1)]
    );
    assert_eq!(
        SessionStore::load(&two).await.unwrap().iter().map(|s| s.handle).collect::<Vec<_>>(),
        [SessionHandle(2)]
    );

    let err = SessionStore::apply(&two, vec![insert(SessionHandle(1))]).await.unwrap_err().to_string();
    assert!(err.contains("session #1 belongs to another node"), "{err}");
    let checkpoint = tether_proto::dtls::Checkpoint {
        handle: SessionHandle(1),
        peer: "127.0.0.1:7000".parse().unwrap(),
        write_limit: u64::MAX >> 20,
        replay_window: (99, 1),
    };
    let foreign = vec![SessionWrite::Checkpoint(checkpoint), SessionWrite::Delete(SessionHandle(1))];
    SessionStore::apply(&two, foreign).await.unwrap();
    let kept = SessionStore::load(&one).await.unwrap();
    assert_eq!((kept.len(), kept[0].peer), (1, peer), "node 2 changed nothing of node 1's session");
    assert_eq!(kept[0].snapshot.write_limit(), snapshot.write_limit());

    let err = PostgresStore::connect(&db.url, NodeId(1), None).await.unwrap_err().to_string();
    assert!(err.contains("node 1 is in use by another tether serve"), "{err}");
    drop(one);
    // The lock goes with its connection; the server notices the close at once or nearly.
    let again = postgres::retry(Duration::from_secs(10), || PostgresStore::connect(&db.url, NodeId(1), None)).await;
    assert_eq!(SessionStore::count(&again).await.unwrap(), 1, "node 1's session is there for it");
    drop((again, two));
    db.drop_database().await;
}

/// A database put back from an older copy (a restore, here a real copy of the database
/// made with `CREATE DATABASE … TEMPLATE`) is older than the node's generation marker: its
/// sessions are not restored.
#[tokio::test]
async fn a_postgres_database_put_back_from_an_older_copy_is_detected() {
    let Some(db) = TestDatabase::create("rollback").await else { return };
    let data = dir("postgres-rollback");
    let store = PostgresStore::connect(&db.url, NodeId(3), Some(&data)).await.unwrap();
    assert_eq!(SessionStore::opened(&store).rolled_back, None);
    SessionStore::apply(&store, vec![SessionWrite::Delete(SessionHandle(1))]).await.unwrap();
    drop(store);
    let admin = db.admin().await;
    let copy = format!("{}_copy", db.name);
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {copy}")).await.unwrap();
    let copy_sql = format!("CREATE DATABASE {copy} TEMPLATE {}", db.name);
    // The template may not have connections: the store's close reaches the server soon.
    postgres::retry(Duration::from_secs(10), || admin.batch_execute(&copy_sql)).await;

    let store = PostgresStore::connect(&db.url, NodeId(3), Some(&data)).await.unwrap();
    assert_eq!(SessionStore::opened(&store).rolled_back, None, "reopened as it was left");
    SessionStore::apply(&store, vec![SessionWrite::Delete(SessionHandle(2))]).await.unwrap();
    drop(store);
    let restored = PostgresStore::connect(&db.url_of(&copy), NodeId(3), Some(&data)).await.unwrap();
    let rolled_back = SessionStore::opened(&restored).rolled_back.expect("the copy is older than the marker");
    assert!(rolled_back.database < rolled_back.marker, "{rolled_back:?}");
    drop(restored);
    let again = PostgresStore::connect(&db.url_of(&copy), NodeId(3), Some(&data)).await.unwrap();
    assert_eq!(SessionStore::opened(&again).rolled_back, None, "the store goes on from there");
    drop(again);
    admin.batch_execute(&format!("DROP DATABASE {copy} WITH (FORCE)")).await.unwrap();
    db.drop_database().await;
    let _ = std::fs::remove_dir_all(&data);
}

/// Nodes that start together migrate the schema once; a schema newer than the node knows,
/// a URL that does not parse and a server that is not there are refused with what is wrong.
#[tokio::test]
async fn postgres_schema_and_connection_errors_say_what_is_wrong() {
    let Some(db) = TestDatabase::create("schema").await else { return };
    let starts =
        futures::future::join_all((10..14).map(|node| PostgresStore::connect(&db.url, NodeId(node), None))).await;
    assert!(starts.iter().all(Result::is_ok), "{starts:?}");
    drop(starts);
    let client = db.client().await;
    // A database of an older tether (schema version 1, before start counts) is brought up to
    // date, its rows kept.
    let version_1 =
        "ALTER TABLE nodes DROP COLUMN boots, DROP COLUMN channel, DROP COLUMN http, DROP COLUMN lease_until;
         ALTER TABLE sessions DROP COLUMN epoch, DROP COLUMN cid;
         ALTER TABLE registrations DROP COLUMN node;
         DROP INDEX registrations_by_id;
         UPDATE tether_schema SET version = 1";
    client.batch_execute(version_1).await.unwrap();
    let store = PostgresStore::connect(&db.url, NodeId(20), None).await.unwrap();
    assert_eq!(SessionStore::opened(&store).handles.boot, 1);
    drop(store);
    client.batch_execute("UPDATE tether_schema SET version = version + 1").await.unwrap();
    let err = PostgresStore::connect(&db.url, NodeId(0), None).await.unwrap_err().to_string();
    assert!(err.contains("written by a newer tether"), "{err}");
    drop(client);

    let err = PostgresStore::connect("postgres://tether@127.0.0.1:5432/x?sslmode=sometimes", NodeId(0), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("the store URL is not valid"), "{err}");
    // Nothing listens on port 1 of loopback.
    let started = Instant::now();
    let err =
        PostgresStore::connect("postgres://tether@127.0.0.1:1/tether", NodeId(0), None).await.unwrap_err().to_string();
    assert!(err.starts_with("postgresql: ") && err.to_lowercase().contains("connect"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "refused, not hung");
    db.drop_database().await;
}

/// A node that stops renewing loses its lease; the others adopt its sessions (each once,
/// however many try at the same moment) with the registrations bound to them, from its
/// last durable reservation on; its own checkpoints are refused from then on, and a restart
/// of it owns nothing it lost.
#[tokio::test]
async fn postgres_leases_adoption_and_fencing() {
    let Some(db) = TestDatabase::create("adoption").await else { return };
    let lease = Duration::from_secs(2);
    let addresses = |port| NodeAddresses {
        channel: SocketAddr::from(([127, 0, 0, 1], port)),
        http: SocketAddr::from(([127, 0, 0, 1], port + 1)),
    };
    let one = PostgresStore::connect(&db.url, NodeId(1), None).await.unwrap();
    let two = PostgresStore::connect(&db.url, NodeId(2), None).await.unwrap();
    let three = PostgresStore::connect(&db.url, NodeId(3), None).await.unwrap();
    for (store, port) in [(&one, 7000), (&two, 7010), (&three, 7020)] {
        store.join(addresses(port), Duration::from_secs(60)).await.unwrap();
    }
    let now = Instant::now();
    let with_cid = snapshot_with_cid();
    let cid = with_cid.connection_id().unwrap().to_vec();
    let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let handles: Vec<_> = (1..=40).map(|i| SessionHandle((1 << 56) | i)).collect();
    let mut writes: Vec<_> =
        handles.iter().map(|&handle| SessionWrite::Insert { handle, peer, snapshot: Box::new(snapshot()) }).collect();
    writes[0] = SessionWrite::Insert { handle: handles[0], peer, snapshot: Box::new(with_cid) };
    SessionStore::apply(&one, writes).await.unwrap();
    let mut registrations = Vec::new();
    for (i, handle) in handles.iter().enumerate().take(10) {
        let mut r = registration(&format!("urn:dev:{i}"), &format!("id{i}"), now);
        r.session = Some(*handle);
        registrations.push(RegistrationWrite::Save(Box::new(r)));
    }
    RegistrationStore::apply(&one, registrations, now).await.unwrap();
    assert_eq!(one.holder_of(&cid).await.unwrap(), Some(NodeId(1)));

    // While node 1's lease is current, nobody adopts anything of it.
    one.join(addresses(7000), lease).await.unwrap();
    let adopted = two.adopt(NodeId(1), Share { rank: 0, of: 1 }, now).await.unwrap();
    assert!(adopted.sessions.is_empty() && adopted.registrations.is_empty());
    assert!(one.renew(lease).await.unwrap());
    tokio::time::sleep(lease + Duration::from_millis(500)).await;
    let nodes = two.nodes().await.unwrap();
    let alive: Vec<_> = nodes.iter().map(|n| (n.node, n.alive)).collect();
    assert_eq!(alive, [(NodeId(1), false), (NodeId(2), true), (NodeId(3), true)]);
    assert_eq!(nodes[0].addresses, Some(addresses(7000)));
    assert_eq!((nodes[0].sessions, nodes[0].registrations), (40, 10));

    // Two survivors adopt at once, each trying for all of it: every session goes to one.
    let everything = Share { rank: 0, of: 1 };
    let (a, b) = tokio::join!(two.adopt(NodeId(1), everything, now), three.adopt(NodeId(1), everything, now));
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut adopted: Vec<_> = a.sessions.iter().chain(&b.sessions).map(|s| s.handle).collect();
    adopted.sort();
    assert_eq!(adopted, handles, "each session adopted exactly once");
    assert_eq!(a.registrations.len() + b.registrations.len(), 10);
    let from = a.sessions.iter().chain(&b.sessions).map(|s| s.snapshot.write_limit()).min().unwrap();
    assert!(from >= snapshot().write_limit(), "the adopter starts at the last durable reservation");
    assert_eq!(two.holder_of(&cid).await.unwrap().map(|n| n == NodeId(2) || n == NodeId(3)), Some(true));

    // Node 1, paused through all of it, comes back: its lease is gone, its checkpoints and
    // deletes change nothing.
    assert!(!one.renew(lease).await.unwrap(), "a lease that ran out is not renewed");
    let checkpoint =
        tether_proto::dtls::Checkpoint { handle: handles[3], peer, write_limit: u64::MAX >> 20, replay_window: (1, 1) };
    let applied =
        SessionStore::apply(&one, vec![SessionWrite::Checkpoint(checkpoint), SessionWrite::Delete(handles[4])])
            .await
            .unwrap();
    assert_eq!(applied.fenced, [handles[3]]);
    let stays = RegistrationWrite::Remove { endpoint: "urn:dev:5".into(), id: "id5".into() };
    RegistrationStore::apply(&one, vec![stays], now).await.unwrap();
    let nodes = two.nodes().await.unwrap();
    assert_eq!((nodes[0].sessions, nodes[0].registrations), (0, 0), "node 1 holds nothing");
    assert_eq!(nodes[1].sessions + nodes[2].sessions, 40, "node 1's delete changed nothing");
    assert_eq!(nodes[1].registrations + nodes[2].registrations, 10);

    // A device without a Connection ID that moved claims its registration at its new node:
    // only its own identity can, and the node that served it is named.
    let served_by = two.registration_node("urn:dev:6").await.unwrap().unwrap();
    let claimer = if served_by == NodeId(2) { &three } else { &two };
    assert!(claimer.claim_registration("id6", "psk:someone-else", now).await.unwrap().is_none());
    assert!(claimer.claim_registration("no-such-id", "psk:identity", now).await.unwrap().is_none());
    let (claimed, previous) = claimer.claim_registration("id6", "psk:identity", now).await.unwrap().unwrap();
    assert_eq!((claimed.endpoint.as_str(), previous), ("urn:dev:6", served_by));
    assert_eq!(two.registration_node("urn:dev:6").await.unwrap(), Some(claimer.node()));
    drop(one);
    let restarted = postgres::retry(Duration::from_secs(10), || PostgresStore::connect(&db.url, NodeId(1), None)).await;
    assert!(SessionStore::load(&restarted).await.unwrap().is_empty(), "a restart owns nothing it lost");
    assert!(RegistrationStore::load(&restarted, now).await.unwrap().is_empty());
    drop((two, three, restarted));
    db.drop_database().await;
}
