//! A throwaway `redis-server` on loopback (its own port, nothing
//! persisted, killed by PID when dropped), for the shared-state tests.

use super::Guard;
use std::path::Path;
use std::process::{Command, Stdio};

/// A redis-server of this test, on `port`, data in `dir` (none persisted).
pub struct Redis {
    pub port: u16,
    child: Option<Guard>,
}

impl Redis {
    pub fn start(dir: &Path) -> Redis {
        let mut r = Redis {
            port: super::free_port(),
            child: None,
        };
        r.restart(dir);
        r
    }

    /// Starts it again on the same port (after [`Redis::kill`]).
    pub fn restart(&mut self, dir: &Path) {
        let child = Command::new(super::tool("redis-server"))
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.child = Some(Guard(child));
        super::wait_port(self.port);
    }

    /// SIGKILL, by PID (the guard's child).
    pub fn kill(&mut self) {
        drop(self.child.take());
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A plain client to look at what the gateways left in the store.
    pub fn client(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}
