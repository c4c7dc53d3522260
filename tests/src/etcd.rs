//! A real etcd server on free loopback ports, killed on drop.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// etcd starts in well under a second; a loaded CI box gets slack.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// An `etcd` process (Debian's `etcd-server`) with its own data folder.
pub struct Etcd {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    data: tempfile::TempDir,
    generation: u32,
}

impl Etcd {
    /// Starts etcd on two free ports and waits until it answers `/health`.
    pub fn start() -> Self {
        let data = tempfile::tempdir().expect("etcd data folder");
        let mut etcd = Self { child: None, client_port: free_port(), peer_port: free_port(), data, generation: 0 };
        // A port is free when picked but not held: another process may bind it before etcd does
        // (CI saw "bind: address already in use"). Then etcd exits, and other ports are tried,
        // with a fresh data folder.
        for _ in 0..3 {
            match etcd.try_spawn() {
                Ok(()) => return etcd,
                Err(why) => eprintln!("{why}; trying other ports"),
            }
            (etcd.client_port, etcd.peer_port, etcd.generation) = (free_port(), free_port(), etcd.generation + 1);
        }
        etcd.spawn();
        etcd
    }

    /// The client URL (`http://127.0.0.1:port`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Kills etcd (SIGKILL), as a crash or a lost node would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports: with its data, or, with
    /// `wipe_data`, empty, as a replaced member that lost its disk.
    pub fn restart(&mut self, wipe_data: bool) {
        self.kill();
        if wipe_data {
            self.generation += 1;
        }
        self.spawn();
    }

    fn data_dir(&self) -> PathBuf {
        self.data.path().join(format!("member-{}", self.generation))
    }

    fn spawn(&mut self) {
        if let Err(why) = self.try_spawn() {
            panic!("{why}");
        }
    }

    /// Starts etcd and waits for its health; an error when it exits during start-up.
    fn try_spawn(&mut self) -> Result<(), String> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let data_dir = self.data_dir();
        let child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(&data_dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--logger", "zap", "--log-outputs", "stderr", "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting etcd (Debian's etcd-server; scripts/setup.sh installs it): {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.healthy() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(format!("etcd exited during start-up: {status}"));
            }
            assert!(Instant::now() < deadline, "etcd did not answer /health within {START_TIMEOUT:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// etcd's own `/health` says `"health":"true"`.
    fn healthy(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let request = format!("GET /health HTTP/1.0\r\nHost: 127.0.0.1:{}\r\n\r\n", self.client_port);
        let mut answer = String::new();
        stream.write_all(request.as_bytes()).is_ok()
            && stream.read_to_string(&mut answer).is_ok()
            && answer.contains(r#""health":"true""#)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port nothing listens on now (the OS's pick, released at once).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}
