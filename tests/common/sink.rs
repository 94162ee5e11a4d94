//! Postfix's smtp-sink as a real legacy backend for end-to-end tests.

use super::{free_port, tool, wait_port, Guard};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Postfix's smtp-sink on a free port, dumping each message into `dir`.
pub struct Sink {
    pub port: u16,
    pub dir: PathBuf,
    _child: Guard,
}

impl Sink {
    pub fn start(dir: &Path) -> Sink {
        let bin = tool("smtp-sink");
        std::fs::create_dir_all(dir).unwrap();
        // smtp-sink (running as nobody) writes the dump files
        Command::new("chmod").arg("0777").arg(dir).status().unwrap();
        let port = free_port();
        let child = Command::new(bin)
            .args([
                "-u",
                "nobody",
                "-h",
                "legacy-sink",
                "-m",
                "2048",
                "-t",
                "60",
                "-d",
            ])
            .arg(format!("{}/%M.", dir.display()))
            .arg(format!("127.0.0.1:{port}"))
            .arg("1024")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let guard = Guard(child);
        wait_port(port);
        Sink {
            port,
            dir: dir.to_path_buf(),
            _child: guard,
        }
    }

    /// Messages the sink has written so far.
    pub fn messages(&self) -> Vec<Vec<u8>> {
        let mut files: Vec<_> = std::fs::read_dir(&self.dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .collect();
        files.sort();
        files.iter().map(|p| std::fs::read(p).unwrap()).collect()
    }

    /// Waits briefly for the sink to finish writing `n` files.
    pub fn wait_count(&self, n: usize) -> usize {
        for _ in 0..100 {
            let c = self.messages().len();
            if c >= n {
                return c;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.messages().len()
    }
}
