//! Interoperability with the real `openssl s_client` and `openssl s_server` processes over
//! UDP on 127.0.0.1, for every PSK suite.

#![allow(clippy::disallowed_methods, reason = "tests pick their starting instant and drive real sockets")]

mod support;

use std::io::Write;
use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::udp::{drive_session, local, serve_echo, KillOnDrop, Lines};
use support::*;
use tether_proto::dtls::{CipherSuite, Endpoint, EndpointConfig, EndpointEvent, Event, PeerIdentity, Session};

/// Every PSK suite: the AEAD ones on by default, and the CBC ones (on when configured).
const SUITES: [CipherSuite; 5] = [
    CipherSuite::PskAes128Ccm8,
    CipherSuite::PskAes128GcmSha256,
    CipherSuite::PskAes128Ccm,
    CipherSuite::PskAes128CbcSha256,
    CipherSuite::EcdhePskAes128CbcSha256,
];

#[test]
fn openssl_s_client_connects_to_our_endpoint_and_gets_its_echo() {
    for suite in SUITES {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = local(&socket).port();
        let session = fast_session().cipher_suites(&CipherSuite::ALL);
        let endpoint = Endpoint::new(psk_server(session), EndpointConfig::new([3; 32]), Instant::now()).unwrap();
        let (events_tx, events) = mpsc::channel();
        let (stop, stop_rx) = mpsc::channel();
        let server =
            std::thread::spawn(move || serve_echo(socket, endpoint, Duration::from_secs(20), events_tx, stop_rx));

        let mut child = KillOnDrop(
            Command::new("openssl")
                .args(["s_client", "-dtls1_2", "-quiet", "-psk_identity", IDENTITY, "-psk", KEY_HEX])
                .args(["-cipher", suite.openssl_name(), "-connect", &format!("127.0.0.1:{port}")])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("openssl is installed (.ci/run installs it)"),
        );
        let stdout = Lines::new(child.0.stdout.take().unwrap());
        let _stderr = Lines::new(child.0.stderr.take().unwrap());

        // Wait for the handshake on our side before typing.
        let connected = events.recv_timeout(Duration::from_secs(10)).expect("s_client connects");
        assert!(
            matches!(&connected, EndpointEvent::Connected { identity: Some(PeerIdentity::Psk(id)), .. } if id == IDENTITY.as_bytes()),
            "{suite:?}: {connected:?}"
        );
        let line = format!("hello from s_client over {}", suite.openssl_name());
        writeln!(child.0.stdin.as_mut().unwrap(), "{line}").unwrap();
        let echoed = stdout.wait(Duration::from_secs(10), |l| l == line);
        assert!(echoed.is_ok(), "{suite:?}: s_client printed {echoed:?}");
        drop(child);
        stop.send(()).unwrap();
        let endpoint = server.join().unwrap();
        assert_eq!(endpoint.stats().handshakes_completed, 1);
    }
}

#[test]
fn our_client_connects_to_openssl_s_server() {
    for suite in SUITES {
        let mut child = KillOnDrop(
            Command::new("openssl")
                .args(["s_server", "-dtls1_2", "-nocert", "-psk", KEY_HEX, "-accept", "127.0.0.1:0"])
                .args(["-cipher", &SUITES.map(|s| s.openssl_name()).join(":")])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("openssl is installed (.ci/run installs it)"),
        );
        let stdout = Lines::new(child.0.stdout.take().unwrap());
        let _stderr = Lines::new(child.0.stderr.take().unwrap());
        let accept = stdout.wait(Duration::from_secs(10), |l| l.starts_with("ACCEPT")).expect("s_server starts");
        let addr = accept.trim_start_matches("ACCEPT").trim().to_string();

        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(&addr).unwrap();
        let mut session = Session::client(&psk_client(only(suite)), Instant::now()).unwrap();
        let connected =
            drive_session(&socket, &mut session, Duration::from_secs(10), |_, e| matches!(e, Event::Connected { .. }));
        assert!(connected, "{suite:?}: {:?}", session.close_reason());
        assert_eq!(session.cipher_suite(), Some(suite));

        let line = format!("ping from tether over {}", suite.openssl_name());
        session.send(Instant::now(), format!("{line}\n").as_bytes()).unwrap();
        drive_session(&socket, &mut session, Duration::from_millis(50), |_, _| false);
        assert!(stdout.wait(Duration::from_secs(10), |l| l == line).is_ok(), "{suite:?}: s_server did not print it");

        writeln!(child.0.stdin.as_mut().unwrap(), "pong from s_server").unwrap();
        let mut got = Vec::new();
        drive_session(&socket, &mut session, Duration::from_secs(10), |_, e| {
            if let Event::Data(d) = e {
                got.extend_from_slice(d);
            }
            got.ends_with(b"\n")
        });
        assert_eq!(String::from_utf8_lossy(&got), "pong from s_server\n", "{suite:?}");
    }
}

/// A server with CBC suites chooses one only for a client that offers Encrypt-then-MAC: an
/// `s_client -no_etm` gets an AEAD suite if it offers one, and no handshake if it does not.
#[test]
fn cbc_is_chosen_only_with_encrypt_then_mac() {
    let cases = [
        ("PSK-AES128-CBC-SHA256:PSK-AES128-CCM8", false, Some("PSK-AES128-CBC-SHA256")),
        ("PSK-AES128-CBC-SHA256:PSK-AES128-CCM8", true, Some("PSK-AES128-CCM8")),
        ("PSK-AES128-CBC-SHA256", true, None),
    ];
    for (offered, no_etm, expected) in cases {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = local(&socket).port();
        // The server prefers CBC, so only the EtM rule can make it choose otherwise.
        let order = [CipherSuite::PskAes128CbcSha256, CipherSuite::PskAes128Ccm8];
        let endpoint = Endpoint::new(
            psk_server(fast_session().cipher_suites(&order)),
            EndpointConfig::new([4; 32]),
            Instant::now(),
        )
        .unwrap();
        let (events_tx, events) = mpsc::channel();
        let (stop, stop_rx) = mpsc::channel();
        let server =
            std::thread::spawn(move || serve_echo(socket, endpoint, Duration::from_secs(20), events_tx, stop_rx));
        let mut command = Command::new("openssl");
        command.args(["s_client", "-dtls1_2", "-psk_identity", IDENTITY, "-psk", KEY_HEX, "-cipher", offered]);
        if no_etm {
            command.arg("-no_etm");
        }
        let output = command
            .args(["-connect", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .expect("openssl is installed (.ci/run installs it)");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let chosen = stdout
            .lines()
            .find(|l| l.trim_start().starts_with("Cipher    :"))
            .and_then(|l| l.split(':').nth(1))
            .map(|c| c.trim().to_string())
            .filter(|c| c != "0000");
        assert_eq!(chosen.as_deref(), expected, "{offered} no_etm={no_etm}");
        if expected.is_some() {
            let connected = events.recv_timeout(Duration::from_secs(10));
            assert!(matches!(connected, Ok(EndpointEvent::Connected { .. })), "{offered}: {connected:?}");
        }
        stop.send(()).unwrap();
        let _ = server.join().unwrap();
    }
}

/// The certificate suites added for LwM2M devices (the 16-byte-tag CCM, and CBC with
/// Encrypt-then-MAC) handshake with `openssl s_client` against our endpoint's certificate
/// and carry its echo.
#[test]
fn openssl_s_client_gets_the_ecdsa_ccm_and_cbc_suites() {
    let pki = pki();
    let dir = std::env::temp_dir().join(format!("tether-interop-ecdsa-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, pki.ca.certificate.to_pem().unwrap()).unwrap();
    for suite in [CipherSuite::EcdheEcdsaAes128Ccm, CipherSuite::EcdheEcdsaAes128CbcSha256] {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = local(&socket).port();
        let server = x509_server(&pki, tether_proto::dtls::ClientAuth::None, only(suite));
        let endpoint = Endpoint::new(server, EndpointConfig::new([5; 32]), Instant::now()).unwrap();
        let (events_tx, events) = mpsc::channel();
        let (stop, stop_rx) = mpsc::channel();
        let server =
            std::thread::spawn(move || serve_echo(socket, endpoint, Duration::from_secs(20), events_tx, stop_rx));
        let mut child = KillOnDrop(
            Command::new("openssl")
                .args(["s_client", "-dtls1_2", "-quiet", "-verify_return_error", "-CAfile"])
                .arg(&ca)
                .args(["-cipher", suite.openssl_name(), "-connect", &format!("127.0.0.1:{port}")])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("openssl is installed (.ci/run installs it)"),
        );
        let stdout = Lines::new(child.0.stdout.take().unwrap());
        let _stderr = Lines::new(child.0.stderr.take().unwrap());
        let connected = events.recv_timeout(Duration::from_secs(10)).expect("s_client connects");
        assert!(matches!(connected, EndpointEvent::Connected { .. }), "{suite:?}: {connected:?}");
        let line = format!("hello over {}", suite.openssl_name());
        writeln!(child.0.stdin.as_mut().unwrap(), "{line}").unwrap();
        assert!(stdout.wait(Duration::from_secs(10), |l| l == line).is_ok(), "{suite:?}: no echo");
        drop(child);
        stop.send(()).unwrap();
        let _ = server.join().unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
