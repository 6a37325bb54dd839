//! nginx's stream module as the UDP load balancer in front of a cluster's nodes (Debian's
//! `nginx` with `libnginx-mod-stream`), as operators run it: sessions hashed by the
//! client's address and port (`hash $remote_addr$remote_port consistent`), a node that
//! refuses datagrams taken out for a while.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running nginx, ended (by its PID) when dropped. One process (`master_process off`):
/// a master ended by its PID would leave its workers running.
pub struct Nginx {
    child: Child,
    /// Where devices send.
    pub addr: SocketAddr,
    dir: PathBuf,
}

/// Where Debian puts the stream module.
const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

impl Nginx {
    /// nginx on a free loopback port, balancing over `upstreams`; its files in `dir`.
    pub fn start(dir: &Path, upstreams: &[SocketAddr]) -> Self {
        assert!(
            Path::new(STREAM_MODULE).exists(),
            "{STREAM_MODULE} is missing: install Debian's nginx and libnginx-mod-stream (.ci/run does)"
        );
        std::fs::create_dir_all(dir).unwrap();
        let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let servers: String =
            upstreams.iter().map(|u| format!("    server {u} max_fails=1 fail_timeout=30s;\n")).collect();
        let config = format!(
            "load_module {STREAM_MODULE};\n\
             master_process off;\n\
             worker_rlimit_nofile 16384;\n\
             pid {dir}/nginx.pid;\n\
             error_log {dir}/error.log warn;\n\
             events {{ worker_connections 8192; }}\n\
             stream {{\n  upstream tether {{\n    hash $remote_addr$remote_port consistent;\n{servers}  }}\n  \
             server {{ listen {addr} udp; proxy_pass tether; proxy_timeout 300s; }}\n}}\n",
            dir = dir.display()
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nginx (Debian's nginx package)");
        // It listens once its pid file is written.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !dir.join("nginx.pid").exists() {
            assert!(std::time::Instant::now() < deadline, "nginx did not start; see {}/error.log", dir.display());
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, addr, dir: dir.to_path_buf() }
    }

    /// Its error log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
