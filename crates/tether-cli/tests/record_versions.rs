//! `tether serve` takes an initial ClientHello whose record version is any {254, x}, as
//! Mbed TLS 2.x clients with a low minimum version send it ({254, 0}), over real UDP.

#![allow(clippy::disallowed_methods, reason = "a real socket against a real server process")]

mod support;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use support::{Server, KEY};
use tether_proto::dtls::{ClientConfig, DtlsContext, PskKey, Session};

/// Sets the record version of a datagram's first record to {254, `minor`}.
fn with_record_version(mut datagram: Vec<u8>, minor: u8) -> Vec<u8> {
    datagram[1..3].copy_from_slice(&[0xfe, minor]);
    datagram
}

#[test]
fn a_254_0_client_hello_completes_a_handshake_with_the_real_server() {
    let data = std::env::temp_dir().join(format!("tether-record-versions-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let server = Server::start(&data);
    let context = DtlsContext::client(ClientConfig::psk("device-0", PskKey::from_hex(KEY).unwrap())).unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(server.coaps).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut client = Session::client(&context, Instant::now()).unwrap();
    let mut hellos = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client.is_established() && Instant::now() < deadline {
        while let Some(datagram) = client.poll_transmit() {
            let mut bytes = datagram.contents;
            // Both ClientHellos (before and after the cookie), as such a client sends them.
            if bytes.get(13) == Some(&1) && bytes[3..5] == [0, 0] {
                bytes = with_record_version(bytes, 0);
                hellos += 1;
            }
            socket.send(&bytes).unwrap();
        }
        let mut buffer = [0u8; 2048];
        match socket.recv(&mut buffer) {
            Ok(n) => client.handle_datagram(Instant::now(), &buffer[..n]),
            Err(_) => client.handle_timeout(Instant::now()),
        }
    }
    assert!(client.is_established(), "handshake with {{254, 0}} ClientHellos did not complete");
    assert!(hellos >= 2, "the cookieless and the cookie ClientHello were both {{254, 0}} ({hellos})");
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}
