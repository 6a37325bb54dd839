//! The real `tether serve` and its data directory under accidents and prying eyes: a
//! session store put back from a backup, a store that refuses a write, a damaged file, a
//! kill, and keys that must not stay on disk or show in `ps`.

#[path = "../../tether/tests/support/proxy.rs"]
mod proxy;
mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proxy::{assert_unique_nonces, Behaviour, Impairment, Proxy};
use support::{data_dir, device_0, http, wait_for, wait_registered, Ended, Server, KEY};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_store_put_back_from_a_backup_reuses_no_nonce() {
    let data = data_dir("hostile-store-backup");
    let server = Server::start_logged(&data, &[]);
    let coaps = server.coaps.to_string();
    let proxy = Proxy::start_with(server.coaps, Impairment::none(), Behaviour { capture: true }).await;
    let mut device = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["device", "--endpoint", "urn:dev:0", "--psk-identity", "device-0", "--psk-key", KEY])
        .args(["--server", &format!("coaps://{}", proxy.addr()), "--duration", "120", "--retry-timer", "1"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_registered(&server, 1, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // a checkpoint

    // A consistent backup of the session store, as an operator's nightly copy would be.
    let backup = data.join("sessions-backup.db");
    rusqlite::Connection::open(data.join("sessions.db"))
        .unwrap()
        .execute("VACUUM INTO ?1", [backup.to_str().unwrap()])
        .unwrap();
    // The session goes on: 300 reads, each a record from the server under the session's key.
    for i in 0..300 {
        let (status, read) = http(server.http, "GET", "/api/clients/urn:dev:0/3/0/0", None).await;
        assert_eq!(status, 200, "read {i}: {read}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.sigkill();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(data.join(format!("sessions.db{suffix}")));
    }
    std::fs::copy(&backup, data.join("sessions.db")).unwrap();

    // Started again on the old copy: the copy is detected and its session dropped; the
    // device handshakes once and is read again, and no nonce was used twice under a key.
    let server = Server::start_on(&coaps, &data, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) = http(server.http, "GET", "/api/clients/urn:dev:0/3/0/0?timeout=2", None).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the device is read again after the restore");
    }
    let (_, pool) = http(server.http, "GET", "/api/pool", None).await;
    assert_eq!(pool["dtls"]["sessions_restored"], 0, "the restored copy's session was dropped: {pool}");
    assert!(pool["handshakes_total"].as_u64().unwrap() >= 1, "{pool}");
    let records = assert_unique_nonces(&proxy.captured());
    assert!(records > 600, "{records} records checked");
    let (_, clients) = http(server.http, "GET", "/api/clients", None).await;
    assert_eq!(clients.as_array().map(Vec::len), Some(1), "the registration stands: {clients}");

    let _ = device.kill();
    let _ = device.wait();
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_keeps_the_acknowledged_registration_and_damage_is_refused_at_start() {
    let data = data_dir("hostile-store-failed-write");
    let server = Server::start(&data);
    let mut device = device_0(&server, &["--duration", "120", "--retry-timer", "1"]);
    let first = wait_for(&server, "/api/clients/urn:dev:0", Duration::from_secs(15), |s, _| s == 200).await;

    // Another process holds the registration database's write lock (a backup tool, a
    // full disk, an I/O error: the server's write fails).
    let mut holder = rusqlite::Connection::open(data.join("registrations.db")).unwrap();
    let lock = holder.transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive).unwrap();
    // The device reboots and registers again: the new registration cannot be stored.
    device.kill().unwrap();
    device.wait().unwrap();
    let mut device = device_0(&server, &["--duration", "120", "--retry-timer", "1"]);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (status, listed) = http(server.http, "GET", "/api/clients/urn:dev:0", None).await;
    assert_eq!(status, 200, "the acknowledged registration is still there: {listed}");
    assert_eq!(listed["registration_id"], first["registration_id"], "{listed}");
    // Once the store takes writes again, the device's retry registers it anew.
    lock.rollback().unwrap();
    drop(holder);
    wait_for(&server, "/api/clients/urn:dev:0", Duration::from_secs(20), |s, body| {
        s == 200 && body["registration_id"] != first["registration_id"]
    })
    .await;
    let _ = device.kill();
    let _ = device.wait();

    // Stopped cleanly, started again: nothing to say. Killed: the start says so.
    assert!(server.sigterm().success());
    let server = Server::start_logged(&data, &[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!server.logged("not closed cleanly"), "{:?}", server.log.lock().unwrap());
    server.sigkill();
    let server = Server::start_logged(&data, &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.logged("not closed cleanly") {
        assert!(Instant::now() < deadline, "the start after a kill says so");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(server.sigterm().success());

    // An index page of the registration database is damaged: the server refuses to start
    // and says which file and what to do, instead of answering 5.03 to every device.
    let db = data.join("registrations.db");
    let (root, page_size): (i64, i64) = {
        let db = rusqlite::Connection::open(&db).unwrap();
        let root =
            db.query_row("SELECT rootpage FROM sqlite_master WHERE type = 'index' LIMIT 1", [], |r| r.get(0)).unwrap();
        (root, db.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap())
    };
    let mut bytes = std::fs::read(&db).unwrap();
    let page = usize::try_from((root - 1) * page_size).unwrap();
    for (i, byte) in bytes[page + 8..page + 64].iter_mut().enumerate() {
        *byte = 0xA5 ^ i as u8;
    }
    std::fs::write(&db, bytes).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["serve", "--coaps", "127.0.0.1:0", "--http", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("registrations.db is damaged") && stderr.contains("restore it from a backup"), "{stderr}");
    let _ = std::fs::remove_dir_all(&data);
}

/// Windows of `secret` (16 bytes, varied enough to be key material) found in `haystack`.
fn found_in(secret: &[u8], haystack: &[u8]) -> usize {
    secret
        .windows(16)
        .step_by(4)
        .filter(|w| w.iter().collect::<HashSet<_>>().len() >= 12)
        .filter(|w| haystack.windows(16).any(|h| h == *w))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_stay_out_of_ps_and_off_the_disk_once_their_session_ends() {
    let data = data_dir("hostile-store-secrets");
    let dir = data.join("server");
    // Credentials from the environment: nothing secret on the command line.
    let mut server = Ended(
        Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["serve", "--coaps", "127.0.0.1:0", "--http", "127.0.0.1:0", "--data-dir"])
            .arg(&dir)
            .env("TETHER_PSK", format!("device-0:{KEY}:urn:dev:0 device-1:{KEY}:urn:dev:1"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = std::io::BufRead::lines(std::io::BufReader::new(server.0.stdout.take().unwrap()));
    let mut coaps = None;
    for line in stdout.map_while(Result::ok) {
        if let Some(addr) = line.strip_prefix("tether serve: CoAPs (DTLS 1.2) on udp ") {
            coaps = addr.trim().parse::<SocketAddr>().ok();
        }
        if line.starts_with("tether serve: web UI on") {
            break;
        }
    }
    let coaps = coaps.unwrap();
    let mut device = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["device", "--server", &format!("coaps://{coaps}"), "--psk-identity", "device-0"])
        .args(["--endpoint", "urn:dev:0", "--duration", "60"])
        .env("TETHER_PSK_KEY", KEY)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    for pid in [server.0.id(), device.id()] {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(!String::from_utf8_lossy(&cmdline).contains(KEY), "a key in ps");
    }
    // The session is stored: its snapshot holds its keys.
    let sessions = dir.join("sessions.db");
    let deadline = Instant::now() + Duration::from_secs(15);
    let snapshot: Vec<u8> = loop {
        let found = rusqlite::Connection::open(&sessions)
            .and_then(|db| db.query_row("SELECT snapshot FROM sessions LIMIT 1", [], |row| row.get(0)));
        if let Ok(snapshot) = found {
            break snapshot;
        }
        assert!(Instant::now() < deadline, "the device's session is stored");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Only the owner reads anything in the data directory.
    let mode = |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    for file in ["registrations.db", "registrations.db-wal", "sessions.db", "sessions.db-wal", "api-token"] {
        assert_eq!(mode(&dir.join(file)), 0o600, "{file}");
    }

    // The device leaves (it de-registers, the server closes its session): its keys are
    // gone from the database, its free pages and its write-ahead log.
    assert!(Command::new("kill").args(["-TERM", &device.id().to_string()]).status().unwrap().success());
    device.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let rows: i64 = rusqlite::Connection::open(&sessions)
            .and_then(|db| db.query_row("SELECT COUNT(*) FROM sessions", [], |row| row.get(0)))
            .unwrap_or(1);
        if rows == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the session's row is deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for file in ["sessions.db", "sessions.db-wal"] {
        let bytes = std::fs::read(dir.join(file)).unwrap_or_default();
        assert_eq!(found_in(&snapshot, &bytes), 0, "the ended session's snapshot is still in {file}");
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}
