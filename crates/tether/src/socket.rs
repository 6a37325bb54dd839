//! Datagram sockets: real UDP, or an in-memory network for tests on paused time (tokio's
//! paused clock auto-advances while a task waits on a real socket, so those tests must not
//! use one).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// Receive buffer requested for server sockets: bursts of ClientHellos otherwise drop.
pub const SERVER_RECV_BUFFER: usize = 8 * 1024 * 1024;

/// A datagram socket.
#[derive(Debug)]
pub enum Socket {
    /// A tokio UDP socket.
    Udp(UdpSocket),
    /// A socket on a [`MemoryNetwork`].
    Memory(MemorySocket),
}

impl Socket {
    /// Binds a UDP socket with a receive buffer of `recv_buffer` bytes (the kernel may grant
    /// less: see `net.core.rmem_max`).
    pub async fn bind_udp(addr: SocketAddr, recv_buffer: Option<usize>) -> io::Result<Self> {
        let domain = socket2::Domain::for_address(addr);
        let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size)?;
            let granted = socket.recv_buffer_size()?;
            if granted < size {
                tracing::warn!(requested = size, granted, "udp receive buffer capped by net.core.rmem_max");
            }
        }
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        Ok(Self::Udp(UdpSocket::from_std(socket.into())?))
    }

    /// The receive buffer the kernel granted (UDP), if known.
    pub fn recv_buffer_size(&self) -> Option<usize> {
        match self {
            Self::Udp(s) => socket2::SockRef::from(s).recv_buffer_size().ok(),
            Self::Memory(_) => None,
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Self::Udp(s) => s.local_addr(),
            Self::Memory(s) => Ok(s.addr),
        }
    }

    /// Restricts the socket to one peer, so ICMP errors (port unreachable) surface: a send
    /// to a port nobody listens on makes the next receive fail with `ConnectionRefused`, on
    /// UDP and on a [`MemoryNetwork`] alike.
    pub async fn connect(&self, peer: SocketAddr) -> io::Result<()> {
        match self {
            Self::Udp(s) => s.connect(peer).await,
            Self::Memory(s) => {
                *s.peer.lock().unwrap_or_else(|e| e.into_inner()) = Some(peer);
                Ok(())
            }
        }
    }

    /// Sends one datagram.
    pub async fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<()> {
        match self {
            Self::Udp(s) => {
                if s.peer_addr().is_ok() {
                    s.send(datagram).await.map(drop)
                } else {
                    s.send_to(datagram, to).await.map(drop)
                }
            }
            Self::Memory(s) => {
                s.send_to(datagram, to);
                Ok(())
            }
        }
    }

    /// Receives one datagram.
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match self {
            Self::Udp(s) => s.recv_from(buf).await,
            Self::Memory(s) => s.recv_from(buf).await,
        }
    }

    /// Receives one datagram if one is queued.
    pub fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match self {
            Self::Udp(s) => s.try_recv_from(buf),
            Self::Memory(s) => s.try_recv_from(buf),
        }
    }
}

/// A datagram, or `None` for a port-unreachable error.
type Delivery = (SocketAddr, Option<Vec<u8>>);
type Inbox = mpsc::UnboundedSender<Delivery>;

/// An in-memory datagram network: lossless and instant unless an address is taken down.
/// Datagrams to an address nobody has bound vanish, as UDP's do; a connected socket is told
/// (port unreachable), as on loopback. A down address answers nothing at all.
#[derive(Debug, Clone, Default)]
pub struct MemoryNetwork {
    inner: Arc<Mutex<NetworkInner>>,
}

#[derive(Debug, Default)]
struct NetworkInner {
    sockets: HashMap<SocketAddr, Inbox>,
    down: std::collections::HashSet<SocketAddr>,
    next_port: u16,
}

impl MemoryNetwork {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }

    /// Binds `addr`; port 0 picks a free port.
    pub fn bind(&self, mut addr: SocketAddr) -> io::Result<Socket> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if addr.port() == 0 {
            loop {
                inner.next_port = inner.next_port.wrapping_add(1).max(20_000);
                addr.set_port(inner.next_port);
                if !inner.sockets.contains_key(&addr) {
                    break;
                }
            }
        }
        if inner.sockets.contains_key(&addr) {
            return Err(io::ErrorKind::AddrInUse.into());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        inner.sockets.insert(addr, tx);
        Ok(Socket::Memory(MemorySocket {
            addr,
            network: self.clone(),
            peer: Mutex::new(None),
            inbox: tokio::sync::Mutex::new(rx),
        }))
    }

    /// Takes `addr` off the network (true) or back on (false): while down, everything it
    /// sends or is sent is lost, as for a device that lost its link.
    pub fn set_down(&self, addr: SocketAddr, down: bool) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if down {
            inner.down.insert(addr);
        } else {
            inner.down.remove(&addr);
        }
    }
}

/// A socket on a [`MemoryNetwork`].
#[derive(Debug)]
pub struct MemorySocket {
    addr: SocketAddr,
    network: MemoryNetwork,
    /// Set by `connect`: sends to it that nobody receives are reported.
    peer: Mutex<Option<SocketAddr>>,
    inbox: tokio::sync::Mutex<mpsc::UnboundedReceiver<Delivery>>,
}

impl MemorySocket {
    fn send_to(&self, datagram: &[u8], to: SocketAddr) {
        let inner = self.network.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.down.contains(&self.addr) || inner.down.contains(&to) {
            return;
        }
        match inner.sockets.get(&to) {
            Some(inbox) => {
                let _ = inbox.send((self.addr, Some(datagram.to_vec())));
            }
            None if *self.peer.lock().unwrap_or_else(|e| e.into_inner()) == Some(to) => {
                if let Some(own) = inner.sockets.get(&self.addr) {
                    let _ = own.send((to, None));
                }
            }
            None => {}
        }
    }

    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let mut inbox = self.inbox.lock().await;
        let (from, datagram) = inbox.recv().await.ok_or(io::ErrorKind::NotConnected)?;
        let datagram = datagram.ok_or(io::ErrorKind::ConnectionRefused)?;
        Ok(copy_out(buf, from, &datagram))
    }

    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let mut inbox = self.inbox.try_lock().map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))?;
        let (from, datagram) = inbox.try_recv().map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))?;
        let datagram = datagram.ok_or(io::ErrorKind::ConnectionRefused)?;
        Ok(copy_out(buf, from, &datagram))
    }
}

fn copy_out(buf: &mut [u8], from: SocketAddr, datagram: &[u8]) -> (usize, SocketAddr) {
    let n = datagram.len().min(buf.len());
    buf[..n].copy_from_slice(&datagram[..n]);
    (n, from)
}

impl Drop for MemorySocket {
    fn drop(&mut self) {
        let mut inner = self.network.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.sockets.remove(&self.addr);
    }
}
