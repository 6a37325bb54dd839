//! The baseline of the memory figures: an established DTLS session held by OpenSSL itself,
//! as tether held every session before the record layer (measured in the same run).

use std::collections::VecDeque;
use std::io;

use anyhow::{bail, Result};
use openssl::ssl::{Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslStream, SslVersion};

use super::heap_in_use_bytes;

/// One datagram per read and per write, as DTLS needs.
#[derive(Default)]
struct Pipe {
    incoming: VecDeque<Vec<u8>>,
    outgoing: VecDeque<Vec<u8>>,
}

impl io::Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(datagram) = self.incoming.pop_front() else { return Err(io::ErrorKind::WouldBlock.into()) };
        let n = datagram.len().min(buf.len());
        buf[..n].copy_from_slice(&datagram[..n]);
        Ok(n)
    }
}

impl io::Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outgoing.push_back(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn context(server: bool) -> Result<SslContext> {
    let mut builder = SslContextBuilder::new(SslMethod::dtls())?;
    builder.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
    builder.set_max_proto_version(Some(SslVersion::DTLS1_2))?;
    builder.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET);
    builder.set_cipher_list("PSK-AES128-CCM8")?;
    if server {
        builder.set_psk_server_callback(|_, _, key| {
            key[..9].copy_from_slice(b"secretPSK");
            Ok(9)
        });
    } else {
        builder.set_psk_client_callback(|_, _, identity, key| {
            identity[..9].copy_from_slice(b"identity\0");
            key[..9].copy_from_slice(b"secretPSK");
            Ok(9)
        });
    }
    Ok(builder.build())
}

/// Heap bytes per established OpenSSL DTLS server session, over `count` held at once
/// (PSK-AES128-CCM8, MTU 1200, in memory).
pub fn openssl_session_heap_bytes(count: usize) -> Result<f64> {
    let (server_ctx, client_ctx) = (context(true)?, context(false)?);
    let before = heap_in_use_bytes();
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let mut server = Ssl::new(&server_ctx)?;
        server.set_mtu(1200)?;
        server.set_accept_state();
        let mut client = Ssl::new(&client_ctx)?;
        client.set_mtu(1200)?;
        client.set_connect_state();
        let mut server = SslStream::new(server, Pipe::default())?;
        let mut client = SslStream::new(client, Pipe::default())?;
        let mut done = (false, false);
        for _ in 0..20 {
            done.0 |= client.do_handshake().is_ok();
            let sent: Vec<_> = client.get_mut().outgoing.drain(..).collect();
            server.get_mut().incoming.extend(sent);
            done.1 |= server.do_handshake().is_ok();
            let sent: Vec<_> = server.get_mut().outgoing.drain(..).collect();
            client.get_mut().incoming.extend(sent);
            if done == (true, true) {
                break;
            }
        }
        if done != (true, true) {
            bail!("in-memory OpenSSL handshake did not complete");
        }
        held.push(server);
    }
    let after = heap_in_use_bytes();
    drop(held);
    Ok((after - before) / count as f64)
}
